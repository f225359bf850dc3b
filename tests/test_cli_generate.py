"""sft_jax/cli/generate.py (sft-jax-generate). Responses from a trained run and from an
exported folder are tested in test_hf.py and test_quickstart.py."""

import pytest

from sft_jax.cli import generate


@pytest.mark.parametrize("source", ["--workdir", "--hf"])
def test_a_missing_model_is_one_line(source, tmp_path, capsys):
    assert generate.main([source, str(tmp_path / "nothing"), "--prompt", "Add 2 and 3."]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sft-jax-generate: ") and len(err.strip().splitlines()) == 1


def test_one_source_and_one_input_are_required(capsys):
    with pytest.raises(SystemExit) as e:
        generate.main(["--prompt", "Add 2 and 3."])
    assert e.value.code == 2 and "--workdir" in capsys.readouterr().err
