"""coco-caption's PTB tokenization in Python: the same tokens as pycocoevalcap's PTBTokenizer, without Java.

pycocoevalcap runs Stanford CoreNLP 3.4.1's PTBTokenizer (`-preserveLines -lowerCase`) on every caption and
drops a fixed list of punctuation tokens (PUNCTUATIONS). `tokenize` does both in Python, with the same input
and output: {key: [{"caption": str}, ...]} -> {key: [str, ...]}.

The lexer below reproduces what the Java tokenizer does to English captions, checked by running it
(tests/test_ptb_tokenizer.py compares the two token for token): like the Java one it takes at each position
the longest match of its rules, a rule's trailing context counting towards the length, and the first
rule among equally long ones. What it gives, as Java does:

- contractions split before n't 's 're 've 'll 'd 'm ("is n't", "ca n't", "he 's"); "cannot" -> "can not";
  gonna, gotta, wanna, lemme, gimme -> "gon na", ...; 'tis and 'twas -> "'t is", "'t was";
  apostrophe words kept whole ("o'neill", "rock 'n' roll", "'90s");
- hyphenated words, slashed words ("and/or"), numbers with commas, decimals and colons, dates and fractions
  ("2 1/2" is one token with a no-break space) kept whole; "$", "#", currency symbols split off
  ("50 cents", "$ 5" for euros, "# 3" for pounds); "5:30pm" -> "5:30 pm";
- abbreviations: single letters, acronyms ("u.s."), titles ("mr.", "st.") keep their period; "etc." and
  company, month and day abbreviations keep it and add a "." token (which punctuation removal drops)
  before a capital, a second space or the end of the text: that "." hangs on the next caption's first letter;
- double quotes -> `` and '', single quotes -> ` and ', ( ) [ ] { } -> -LRB- -RRB- -LSB- -RSB- -LCB- -RCB-
  (then lowercased, so that PUNCTUATIONS, which lists "-LRB-", does not remove them, as in pycocoevalcap),
  runs of ? and ! one token, "..." and ". . ." -> "...", 3 or 4 hyphens and dashes -> "--";
- tokens lowercased; other symbols tokens of their own; characters outside the Basic Multilingual Plane
  (emoji) dropped, as Java drops them.

Limits (inputs no caption of this toolkit holds; the tests keep them out): URLs, e-mail addresses and
@handles; words run together across a period with no space after it ("Co.A", "thei.e.,", "f'Tis"), where
Java's rules for abbreviations inside words are not all known here; SGML tags and HTML character entities
beyond the few handled; phone numbers; Windows-1252 control characters; the rarer abbreviations (those of
titles, months, weekdays, companies, "etc." and a few more are known); line separators inside a caption
other than "\n" (Java takes them as line ends, shifting every later caption).
An empty caption gives "" (pycocoevalcap's Java run loses its line).
"""
import re
import unicodedata

from pycocoevalcap.tokenizer.ptbtokenizer import PUNCTUATIONS


def _char_class(predicate):
    """A regex character class of the Basic Multilingual Plane's characters for which predicate holds."""
    ranges, start = [], None
    for code in range(0x10001):
        inside = code < 0x10000 and predicate(chr(code))
        if inside and start is None:
            start = code
        elif not inside and start is not None:
            ranges.append(re.escape(chr(start)) + ("-" + re.escape(chr(code - 1)) if code - 1 > start else ""))
            start = None
    return "[" + "".join(ranges) + "]"


# Character classes. Upper-case only where the Java tokenizer is case-sensitive (capitals after a sentence end).
LETTER = _char_class(str.isalpha)
UPPER = _char_class(str.isupper)
# Symbols the Java tokenizer keeps as tokens of their own (outside the BMP, as emoji, it drops them).
SYMBOL = _char_class(lambda char: unicodedata.category(char) in ("So", "Sm", "Sk", "No")
                     or unicodedata.category(char) == "Po" and not char.isascii())
WORD_CHAR = rf"(?:{LETTER}|[\u00AD\u0300-\u036F])"
APOS = r"(?:['\u0092\u2019]|&apos;)"
APOS_ANY = r"(?:['\u0092\u2019\u0091\u2018\u201B]|&apos;)"
SPACE = r"[ \t\u00A0\u2000-\u200A\u3000]"
SPACE_NL = rf"(?:{SPACE}|\n)"
SENTENCE_END = rf"(?:{SPACE_NL}(?:{SPACE_NL}|{UPPER}|\Z)|\Z)"
NUM = r"(?:\d*(?:[.:,\u00AD\u066B\u066C]\d+)+|\d+)"
HYPHEN = r"[-_\u058A\u2010\u2011]"
THING_PART = rf"(?:[dDoOlL]{APOS_ANY}(?:{LETTER}|\d))?(?:{LETTER}|\d)+"
ACRO = r"(?:[A-Za-z](?:\.[A-Za-z])+)"
# Abbreviations keeping their period; the first kind also ends a sentence before a capital or the line's end.
SENTENCE_ABBREVIATIONS = (
    "jan|feb|mar|apr|jun|jul|aug|sep|sept|oct|nov|dec|mon|tue|tues|wed|thu|thurs|fri|inc|cos?|corp|ltd|plc|"
    "dept|assn|univ|intl|nos?|prop|ph|tel|est|ext|sq|jr|sr|bros|blvd|rd|esq|etc|al|seq")
TITLE_ABBREVIATIONS = (
    "mr|mrs|ms|ft|drs?|profs?|sens?|reps?|lt|col|gen|govs?|rev|maj|sgt|capt|mt|ste?|ave|pres|hon|vs|cf")
# Words that start a sentence after an acronym or a letter ("U.S. The" -> "u.s. . the", "B. The" -> "b . the").
SENTENCE_STARTS = (
    "About|According|Additionally|After|An|A|As|At|But|Earlier|He|Her|Here|However|If|In|It|Last|Many|More|"
    r"Mr\.|Ms\.|Now|Once|One|Other|Our|She|Since|So|Some|Such|That|The|Then|There|These|They|This|We|When|"
    "While|What|Yet|You")
QUOTE_CHARS = "`\u2018\u2019\u201A\u201B\u201C\u201D\u0091\u0092\u0093\u0094\u201E\u201F\u2039\u203A\u00AB\u00BB"
LEFT_QUOTES = {"\u0091": "`", "\u2018": "`", "\u201B": "`", "\u2039": "`",
               "\u0093": "``", "\u201C": "``", "\u00AB": "``"}
RIGHT_QUOTES = {"\u0092": "'", "\u2019": "'", "\u203A": "'", "\u0094": "''", "\u201D": "''", "\u00BB": "''"}
CURRENCIES = {"\u00A2": "cents", "\u00A3": "#", "\u0080": "$", "\u00A4": "$", "\u20A0": "$", "\u20AC": "$"}
FRACTIONS = {"\u00BC": "1/4", "\u00BD": "1/2", "\u00BE": "3/4", "\u2153": "1/3", "\u2154": "2/3"}
BRACKETS = {"(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-"}


def _quotes(text, probably_left):
    """A quote token as the Java tokenizer writes it (its LaTeX quotes): ` `` for opening, ' '' for closing."""
    text = text.replace("&apos;", "'").replace("&quot;", '"')
    text = text.replace("'", "`" if probably_left else "'").replace('"', "``" if probably_left else "''")
    return "".join(LEFT_QUOTES.get(char) or RIGHT_QUOTES.get(char) or char for char in text)


def _keep(text):
    """The matched text as the token, soft hyphens removed."""
    return text.replace("\u00AD", "")


def _dashes(text):
    """3 or 4 hyphens are the PTB dash "--"; other runs stay as they are."""
    return "--" if 3 <= len(text) <= 4 else text


# (pattern, action, pushback): `pattern` may end in a group `context`, the trailing context, which counts
# towards the match's length but is not consumed; `pushback` characters of the token are given back too.
# Order matters only between matches of the same length: the first rule wins, as in the Java lexer.
RULES = [
    (r"(?i:can)(?P<context>(?i:not))", _keep, 0),
    (r"(?i:gon(?=na)|got(?=ta)|wan(?=na)|lem(?=me)|gim(?=me))(?P<context>\w\w)", _keep, 0),
    (rf"{APOS}[tT](?P<context>(?i:is|was))", _keep, 0),
    (r"&(?:MD|mdash|ndash);|[\u0096\u0097\u2013\u2014\u2015]", lambda text: "--", 0),
    (r"&amp;", lambda text: "&", 0),
    (rf"{WORD_CHAR}+(?P<context>{APOS}(?:[msdMSD]|[rR][eE]|[vV][eE]|[lL][lL]))", _keep, 0),
    (rf"[A-Za-z\u00AD]*[A-MO-Za-mo-z]\u00AD*(?P<context>[nN]{APOS_ANY}[tT])", _keep, 0),
    (rf"{WORD_CHAR}+", _keep, 0),
    (rf"{LETTER}+(?:\.{LETTER}(?:{LETTER}|\d)*)+|{LETTER}+(?:[?!]{LETTER}+)+", _keep, 0),
    (r"<\/?[A-Za-z!][^>]*>|(?i:c\+\+|[cf]#)", _keep, 0),
    ((rf"{APOS}[nN]{APOS}?|[lLdDjJ]{APOS}|(?i:dunkin|somethin|ol){APOS}|{APOS}(?i:em)"
      rf"|[A-HJ-XZn]{APOS}{LETTER}{{2,}}|{APOS}[2-9]0[sS]|{APOS}(?i:till?)"
      rf"|{LETTER}+[aeiouyAEIOUY]{APOS_ANY}[aeiouA-Z]{LETTER}*|{APOS}(?i:cause)"
      r"|(?i:cont'd\.?|nor'easter|c'mon|e'er|s'mores|ev'ry|li'l|nat'l)"), _keep, 0),
    (rf"[yY]{APOS}(?P<context>{LETTER})", _keep, 0),
    (rf"{APOS}(?:[msdMSD]|[rR][eE]|[vV][eE]|[lL][lL])(?P<context>[^A-Za-z]|\Z)", lambda text: _quotes(text, False), 0),
    (rf"[nN]{APOS_ANY}[tT]", lambda text: _quotes(text, False), 0),
    (r"\d{1,2}[-/]\d{1,2}[-/]\d{2,4}", _keep, 0),
    (rf"[-+]?{NUM}", _keep, 0),
    (r"(?:\d{1,4}[- \u00A0])?\d{1,4}(?:\\?/|\u2044)\d{1,4}", lambda text: text.replace(" ", "\u00A0"), 0),
    (r"[\u00BC\u00BD\u00BE\u2153\u2154]", lambda text: FRACTIONS[text], 0),
    (rf"-(?:RRB|LRB|RCB|LCB|RSB|LSB)-|(?i:pro|anti)-|(?i:cap){APOS}[nN]|(?i:c){APOS}(?i:est)", _keep, 0),
    (r"[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}(?:\\?/[A-Za-z0-9]+(?:-[A-Za-z]+){0,2}){1,2}", _keep, 0),
    (r"[A-Z]*\$|#", _keep, 0),
    (r"[\u00A2\u00A3\u00A4\u00A5\u0080\u20A0\u20AC]", lambda text: CURRENCIES.get(text, text), 0),
    (rf"{ACRO}\.(?P<context>{SPACE_NL}+(?:{SENTENCE_STARTS})(?:{SPACE_NL}|\Z))", _keep, 1),
    (rf"[A-Za-z](?P<context>\.{SPACE_NL}+(?:{SENTENCE_STARTS})(?:{SPACE_NL}|\Z))", _keep, 0),
    (rf"(?i:(?:{SENTENCE_ABBREVIATIONS})\.)(?P<context>{SENTENCE_END})", _keep, 1),
    (rf"(?i:(?:{SENTENCE_ABBREVIATIONS})\.)", _keep, 0),
    (rf"(?:{ACRO}|(?i:{TITLE_ABBREVIATIONS})|[A-Za-z])\.", _keep, 0),
    (rf"{ACRO}(?P<context>{SPACE_NL}|\Z)", _keep, 0),
    (rf"{APOS}\d\d(?P<context>{SPACE_NL}|\Z)", _keep, 0),
    (rf"{WORD_CHAR}+\.(?P<context>[,;:])", _keep, 0),
    (r'(?:"|&quot;)(?P<context>[A-Za-z0-9$])', lambda text: _quotes(text, True), 0),
    (r'"|&quot;', lambda text: _quotes(text, False), 0),
    (r"[+%&\u2030\u2031~^]", _keep, 0),
    (r"[\[({]", lambda text: BRACKETS[text], 0),
    (r"[\])}]", lambda text: BRACKETS[text], 0),
    (r"-+", _dashes, 0),
    (r"\.{3,5}|(?:\.[ \u00A0]){2,4}\.|[\u0085\u2026]", lambda text: "...", 0),
    (r"@+|#+|_+", _keep, 0),
    (r"\*+", _keep, 0),
    (r"[,;:]", _keep, 0),
    (r"[?!]+", _keep, 0),
    (r"[.\u00A1\u00BF]", _keep, 0),
    (r"[=/<>]", _keep, 0),
    (rf"[A-Za-z0-9][A-Za-z0-9.,\u00AD]*(?:-(?:[A-Za-z0-9\u00AD]+|{ACRO}\.))+(?P<context>[,;:])?", _keep, 0),
    (rf"{THING_PART}(?:{HYPHEN}{THING_PART})*(?:\.(?P<context>[,;:]))?", _keep, 0),
    (r"[A-Z]+(?:[+&][A-Z]+)+", _keep, 0),
    (r"'(?P<context>[A-Za-z][^ \t\n\r\u00A0])", lambda text: _quotes(text, True), 0),
    (rf"{APOS}(?:[msdMSD]|[rR][eE]|[vV][eE]|[lL][lL])", lambda text: _quotes(text, False), 0),
    (rf"''|[{QUOTE_CHARS}]{{1,2}}|{APOS}", lambda text: _quotes(text, False), 0),
    (rf"{SPACE}+|[\u200B\u200E\u200F\uFEFF\x00|\\\x7f]", None, 0),
    (SYMBOL, _keep, 0),
]
COMPILED_RULES = [(re.compile(pattern), action, pushback) for pattern, action, pushback in RULES]


def ptb_lines(text):
    """The Java PTBTokenizer's tokens (`-preserveLines`) of each line of text, before lowercasing and
    punctuation removal. A line's last tokens can depend on the next line, as in Java: "co." before a
    capital or the end of the text is "co. ."."""
    lines, position = [[]], 0
    while position < len(text):
        if text[position] == "\n":
            lines.append([])
            position += 1
            continue
        rule_match, action, pushback = _longest_match(text, position)
        if rule_match is None:  # untokenizable: the Java tokenizer deletes it
            position += 1
            continue
        token = text[position:rule_match.start("context") if _has_context(rule_match) else rule_match.end()]
        if action is not None:
            lines[-1].append(action(token))
        position += len(token) - pushback
    return lines


def _has_context(rule_match):
    """Whether the rule matched with a trailing context."""
    return "context" in rule_match.re.groupindex and rule_match.group("context") is not None


def _longest_match(line, position):
    """(match, action, pushback) of the rule with the longest match at position, the first of equals;
    (None, None, 0) when none matches."""
    best = (None, None, 0)
    for pattern, action, pushback in COMPILED_RULES:
        rule_match = pattern.match(line, position)
        if rule_match and rule_match.end() > position and (
                best[0] is None or rule_match.end() > best[0].end()):
            best = (rule_match, action, pushback)
    return best


def tokenize(captions_for_image):
    """pycocoevalcap's PTBTokenizer.tokenize without Java: {key: [{"caption": str}, ...]} -> {key: [str, ...]}.

    Like it, every caption is one line of one text (a caption's newlines become spaces), since a line's
    tokens can depend on the next line's first letter."""
    keys = [key for key, captions in captions_for_image.items() for _ in captions]
    text = "\n".join(caption["caption"].replace("\n", " ") for captions in captions_for_image.values()
                     for caption in captions)
    tokenized = {key: [] for key in captions_for_image}
    for key, tokens in zip(keys, ptb_lines(text)):
        tokenized[key].append(" ".join(token for token in map(str.lower, tokens) if token not in PUNCTUATIONS))
    return tokenized
