"""hf_convert.ConfigFields: the one typed reader of config.json fields (Hugging Face DPT and Depth Anything)."""
import pytest

from dpt_fast.hf_convert import ConfigFields, HFConversionError


class _Refused(ValueError):
    pass


def test_each_read_checks_its_value_and_raises_the_callers_error_naming_the_field():
    fields = ConfigFields({"size": "64", "image": [518, 520], "kind": "absolute", "head": True, "taps": 3,
                           "backbone": [1], "width": 0}, "config.json: ", _Refused)
    reads = {"size": lambda: fields.int("size", 1, 1, 8), "image": lambda: fields.square("image", 1, 1, 8192),
             "kind": lambda: fields.choice("kind", "relative", ("relative", "metric")),
             "head": lambda: fields.choice("head", -1, (-1, 3)), "taps": lambda: fields.list("taps", []),
             "backbone": lambda: fields.object("backbone"),
             "width": lambda: fields.number("width", 1, 0, 9, lo_open=True)}
    for name, read in reads.items():
        with pytest.raises(_Refused, match=f"^config.json: {name}"):
            read()
    ok = ConfigFields({"image": [518, 518], "head": 3})
    assert (ok.square("image", 1, 1, 8192), ok.choice("head", -1, (-1, 3)), ok.int("size", 4, 1, 8)) == (518, 3, 4)
    with pytest.raises(HFConversionError, match="size"):  # the Hugging Face DPT converter's error by default
        ConfigFields({"size": None}).int("size", 1, 1, 8)
