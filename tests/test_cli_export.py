"""sft_jax/cli/export.py (sft-jax-export). Its round trip (a fine-tuned run exported and
loaded by transformers with the run's logits) is tested in test_hf.py."""

from sft_jax.cli import export


def test_a_workdir_without_checkpoints_is_one_line(tmp_path, capsys):
    assert export.main(["--workdir", str(tmp_path), "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sft-jax-export: ") and "no checkpoints under" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "hf").exists()
