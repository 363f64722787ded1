"""The documentation stays true to the code: the cfg table of docs/cfg.md lists every key of
config.CFG_SCHEMA with its default, and the commands the README gives exist in the Makefile."""
import os
import re

import config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def read(name):
    with open(os.path.join(ROOT, name), encoding="utf-8") as file:
        return file.read()


def test_cfg_table_lists_every_key_with_its_default():
    table = read(os.path.join("docs", "cfg.md"))
    rows = dict(re.findall(r"^\| `(\w+)` \| `([^`]*)` \|", table, flags=re.MULTILINE))
    assert list(rows) == list(config.CFG_SCHEMA)
    for key, (default, _, _) in config.CFG_SCHEMA.items():
        assert rows[key] == repr(default), key


def test_the_two_commands_are_make_targets():
    readme, makefile = read("README.md"), read("Makefile")
    for target in ("setup", "demo", "test"):
        assert f"make {target}" in readme
        assert re.search(rf"^{target}:", makefile, flags=re.MULTILINE), target
    assert "PLACEHOLDER" not in readme
