"""The word map's own tokens: those every word map holds, and those that are not words of a caption.

    strip_special([start, 12, 7, end, pad, pad], word_map)  # -> [12, 7]
"""
SPECIAL_WORDS = ("<start>", "<end>", "<pad>")  # tokens of the word map that are not words of a caption
WORD_MAP_TOKENS = ("<start>", "<end>", "<unk>", "<pad>")  # every word map must hold these


def strip_special(caption, word_map):
    """Word ids without <start>, <end> and <pad>."""
    special = {word_map[word] for word in SPECIAL_WORDS}
    return [w for w in caption if w not in special]
