"""sft_jax/harness.py and sft-jax-eval: lm-evaluation-harness on sft_jax models, checked
against transformers running the same (exported) model. The tasks are local YAML files over
a local JSONL (tests/data/harness): multiple choice (log-likelihoods), generation
(generate_until) and perplexity (loglikelihood_rolling); no hub."""

import dataclasses
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("lm_eval")

import torch  # noqa: E402
import transformers  # noqa: E402

from sft_jax import harness, hf  # noqa: E402
from sft_jax.data import DataSpec, load_tokenizer, prompt_ids  # noqa: E402
from sft_jax.model import GPT, GPTConfig  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "data", "harness")  # data_files in the YAMLs are relative to ROOT
CFG = GPTConfig.preset("tiny", max_seq_len=64)  # the real GPT-2 vocabulary, d_model 64, 2 layers


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Random tiny params, the GPT-2 tokenizer, and the same model in transformers."""
    # Random values straight into the params' shapes: no init to compile. Norm scales
    # near 1, everything else (biases too) small and nonzero, so each tensor matters.
    shapes = jax.eval_shape(GPT(CFG).init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, x: (path[-1].key == "scale") + 0.05 * rng.standard_normal(x.shape, "f4"),
        nn.meta.unbox(shapes["params"]),
    )
    tokenizer = load_tokenizer("gpt2")
    folder = str(tmp_path_factory.mktemp("hf"))
    hf.save_hf(CFG, params, folder, tokenizer=tokenizer)
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return params, tokenizer, reference


@pytest.fixture(scope="module")
def evaluated(tiny):
    """All three local tasks through lm-eval's simple_evaluate, per-document records kept."""
    params, tokenizer, _ = tiny
    with _in(ROOT):
        return harness.run_tasks(
            CFG,
            params,
            tokenizer,
            None,
            ["tiny_mc", "tiny_gen", "tiny_ppl"],
            include_path=TASKS,
            log_samples=True,
            bootstrap_iters=0,
            batch_size=4,
        )


class _in:
    """Run in a directory (lm-eval reads data_files relative to the working directory)."""

    def __init__(self, path):
        self.path, self.old = path, None

    def __enter__(self):
        self.old = os.getcwd()
        os.chdir(self.path)

    def __exit__(self, *exc):
        os.chdir(self.old)


def _torch_logprobs(model, ids):
    """log p(ids[t] | ids[:t]) for t ≥ 1 (float64), and whether each is the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].double()
    targets = torch.tensor(ids[1:])
    logp = torch.log_softmax(logits, -1).gather(1, targets[:, None])[:, 0]
    return logp.numpy(), (logits.argmax(-1) == targets).numpy()


def test_multiple_choice_loglikelihoods_equal_transformers(tiny, evaluated):
    _, tokenizer, reference = tiny
    samples = evaluated["samples"]["tiny_mc"]
    assert len(samples) == 6
    right = []
    for sample in samples:
        ours = []
        for (context, continuation), ((logp, greedy),) in zip(
            sample["arguments"], sample["resps"], strict=True
        ):
            # lm-eval's split of a causal pair: the whole text's ids after the context's.
            whole = tokenizer.encode(context + continuation)
            n = len(whole) - len(tokenizer.encode(context))
            ref_logp, ref_greedy = _torch_logprobs(reference, whole)
            assert abs(logp - ref_logp[-n:].sum()) <= 1e-4
            assert greedy == bool(ref_greedy[-n:].all())
            ours.append(logp)
        right.append(int(np.argmax(ours)) == sample["doc"]["answer"])
    assert evaluated["results"]["tiny_mc"]["acc,none"] == pytest.approx(np.mean(right))


def test_generations_equal_transformers_greedy_cut_at_until(tiny, evaluated):
    _, tokenizer, reference = tiny
    for sample in evaluated["samples"]["tiny_gen"]:
        ((context, kwargs),) = sample["arguments"]
        ids = torch.tensor([tokenizer.encode(context)])
        with torch.no_grad():
            out = reference.generate(
                ids, max_new_tokens=kwargs["max_gen_toks"], do_sample=False, pad_token_id=0
            )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        for stop in kwargs["until"]:
            text = text.split(stop)[0]
        assert sample["resps"] == [[text]]


def test_generation_settings_map_to_sampling(tiny):
    from sft_jax.generate import Sampling

    params, tokenizer, _ = tiny
    lm = harness.SftJaxLM(CFG, params, tokenizer, seed=3, max_gen_toks=7)
    sampled = {"until": "Q:", "do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5}
    assert lm._sampling(sampled) == (Sampling(7, 0.7, 5, 0.9, 3), ["Q:"])
    # do_sample false: greedy whatever the temperature (as transformers' generate).
    greedy = {"until": ["\n", ""], "do_sample": False, "temperature": 0.7, "max_gen_toks": 4}
    assert lm._sampling(greedy) == (Sampling(4, 0.0, 0, 1.0, 3), ["\n"])


def test_rolling_loglikelihood_equals_transformers_over_windows(tiny, evaluated):
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    params, tokenizer, reference = tiny
    eos = tokenizer.eos_token_id
    for sample in evaluated["samples"]["tiny_ppl"]:  # each text whole in one window
        (text,) = sample["arguments"][0]
        logp, _ = _torch_logprobs(reference, [eos, *tokenizer.encode(text)])
        assert abs(sample["resps"][0][0] - logp.sum()) <= 1e-4
    # A text longer than max_length: windows of 8 tokens, each token predicted once.
    lm = harness.SftJaxLM(CFG, params, tokenizer, max_length=8)
    text = " ".join(s["doc"]["question"] for s in evaluated["samples"]["tiny_ppl"])
    request = Instance("loglikelihood_rolling", {}, (text,), 0)
    ids = tokenizer.encode(text)
    expected = 0.0
    for context, continuation in map(
        make_disjoint_window, get_rolling_token_windows(ids, eos, 8, 1)
    ):
        logp, _ = _torch_logprobs(reference, context + continuation)
        expected += logp[-len(continuation) :].sum()
    assert len(ids) > 30 and abs(lm.loglikelihood_rolling([request])[0] - expected) <= 1e-4


def test_lora_adapters_score_as_their_merged_kernels(tiny):
    from sft_jax import lora

    params, tokenizer, _ = tiny
    spec = lora.LoraSpec(rank=4)
    rng = np.random.default_rng(1)  # B nonzero, so the adapters change the model
    adapters = jax.tree.map(
        lambda x: 0.2 * rng.standard_normal(x.shape, "f4"),
        nn.meta.unbox(lora.abstract_adapters(CFG, spec)),
    )
    ids = [tokenizer.encode(t) for t in ("Question: What is 2 plus 3?", "Paris is in France")]
    sequences = [(x, len(x) - 1) for x in ids]
    adapted = harness.SftJaxLM(
        CFG, lora.combine(params, adapters), tokenizer, lora=spec.layers(CFG)
    ).score(sequences)
    merged = harness.SftJaxLM(CFG, lora.merge(params, adapters, spec), tokenizer).score(sequences)
    base = harness.SftJaxLM(CFG, params, tokenizer).score(sequences)
    for (a, _), (m, _), (b, _) in zip(adapted, merged, base, strict=True):
        assert abs(a - m) <= 1e-4 and abs(a - b) > 1e-2


def test_packing_fills_rows_without_overflowing_them():
    lengths = [9, 3, 7, 1, 16, 5, 2, 8]
    rows = harness.pack(lengths, 16)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 16 for row in rows)
    assert len(rows) == 4  # 51 tokens in 4 rows of 16
    with pytest.raises(ValueError, match="exceeds rows of 16"):
        harness.pack([17], 16)
    # Rows of whole 128-token blocks for TPU splash attention, which takes no other width.
    assert harness._width_multiple(dataclasses.replace(CFG, attention="splash")) == 128
    assert harness._width_multiple(CFG) == 16  # CPU: the generator's bucket


@pytest.mark.parametrize("template", ["alpaca", "chatml"])
def test_chat_template_renders_the_runs_prompt(tiny, template):
    params, tokenizer, _ = tiny
    spec = DataSpec(train="-", template=template)
    lm = harness.SftJaxLM(CFG, params, tokenizer, spec)
    history = [{"role": "user", "content": "Add 2 and 3."}]
    text = lm.apply_chat_template(history)
    # Exactly the ids training put before a response to this request.
    assert lm.tok_encode(text) == prompt_ids("Add 2 and 3.", spec, tokenizer)
    # Continuing a started answer: the prompt, then the answer so far.
    started = lm.apply_chat_template([*history, {"role": "assistant", "content": "The"}], False)
    assert started == text + "The"
    # An empty turn (a perplexity task's empty question) is left out, not refused.
    assert lm.apply_chat_template([*history, {"role": "user", "content": ""}]) == text


def test_tasks_run_with_the_chat_template(tiny):
    params, tokenizer, _ = tiny
    with _in(ROOT):
        results = harness.run_tasks(
            CFG,
            params,
            tokenizer,
            DataSpec(train="-", template="alpaca"),
            ["tiny_gen"],
            include_path=TASKS,
            limit=2,
            apply_chat_template=True,
            log_samples=True,
            bootstrap_iters=0,
        )
    context = results["samples"]["tiny_gen"][0]["arguments"][0][0]
    assert context.startswith("Below is an instruction") and context.endswith("### Response:\n")
    assert "Question: What is 2 plus 3?" in context


def test_markdown_tables(evaluated):
    table = harness.results_markdown(evaluated)
    acc = evaluated["results"]["tiny_mc"]["acc,none"]
    assert f"| tiny_mc | acc | {acc:.4f} |" in table
    assert "| tiny_ppl | word_perplexity |" in table and "| tiny_gen | exact_match |" in table
    after = json.loads(json.dumps(evaluated))
    after["results"]["tiny_mc"]["acc,none"] = acc + 0.5
    both = harness.before_after_markdown(evaluated, after)
    assert f"| tiny_mc | acc | {acc:.4f} | {acc + 0.5:.4f} | +0.5000 |" in both


def test_a_runs_before_and_after_scores_make_its_report_section(tiny, tmp_path):
    params, tokenizer, _ = tiny
    workdir = str(tmp_path)
    assert harness.report_markdown(workdir) == ""
    options = dict(include_path=TASKS, limit=3, bootstrap_iters=0)
    with _in(ROOT):
        before = harness.evaluate_run(
            workdir, "before", CFG, params, tokenizer, None, ["tiny_mc"], **options
        )
        assert harness.report_markdown(workdir).startswith("## Benchmarks before fine-tuning")
        harness.evaluate_run(workdir, "after", CFG, params, tokenizer, None, ["tiny_mc"], **options)
    acc = before["results"]["tiny_mc"]["acc,none"]
    assert before["config"]["model_num_parameters"] == CFG.num_params()
    assert f"| tiny_mc | acc | {acc:.4f} | {acc:.4f} | +0.0000 |" in harness.report_markdown(
        workdir
    )


def test_a_run_with_harness_tasks_reports_them_before_and_after(tiny, tmp_path):
    """`eval.harness_tasks`: the run's Evaluation scores the tasks before and after training
    and report.md holds them side by side."""
    from sft_jax import evaluate
    from sft_jax.config import EvalConfig

    params, tokenizer, _ = tiny
    eval_cfg = EvalConfig(harness_tasks="tiny_mc", harness_include_path=TASKS, harness_limit=3)
    evaluation = evaluate.Evaluation(
        str(tmp_path), eval_cfg, 0, None, tokenizer, CFG, None, eval_fn=None, batch_size=1
    )
    with _in(ROOT):
        evaluation.generations_before(params)
        evaluation.finish(params)
    report = (tmp_path / "report.md").read_text()
    assert report.startswith("## Benchmarks before and after fine-tuning")
    assert "| tiny_mc | acc | " in report and "+0.0000 |" in report


def test_unknown_tasks_are_named():
    # The local index only: run_tasks also looks through lm-eval's own (5-15 s to build).
    local = harness._task_manager((TASKS,), builtin=False)
    harness.require_known(["tiny_mc", "tiny_gen", "tiny_ppl", "synthetic_qa"], local, [TASKS])
    with pytest.raises(ValueError, match=r"'no_such_task' \(nor under include_path tests"):
        harness.require_known(["tiny_mc", "no_such_task"], local, [TASKS])
    with pytest.raises(ValueError, match="'no/such/folder' is not a folder of YAML tasks"):
        harness.check_tasks(["tiny_mc"], "no/such/folder")


def _workdir_of(params, tmp_path) -> str:
    """A run's workdir with one checkpoint of `params`, as training writes it."""
    from configs import tiny as tiny_config
    from sft_jax import checkpoint
    from sft_jax import config as config_lib

    config = tiny_config.get_config()
    config.model.tokenizer = "gpt2"
    meta = {
        "config": config_lib.to_json(config),
        "model": dataclasses.asdict(CFG),
        "tokenizer": "gpt2",
    }
    workdir = str(tmp_path / "run")
    ckpt = checkpoint.Checkpointer(workdir, async_save=False, writer=True)
    ckpt.save(3, {"params": params}, meta, force=True)
    ckpt.close()
    return workdir


def test_cli_evaluates_a_runs_checkpoint_on_the_mesh(tiny, evaluated, tmp_path, capsys):
    from sft_jax.cli import eval as eval_cli

    params, _, _ = tiny
    workdir, out = _workdir_of(params, tmp_path), str(tmp_path / "scores.json")
    with _in(ROOT):
        code = eval_cli.main(
            [
                "--workdir",
                workdir,
                "--tasks",
                "tiny_mc",
                "--include_path",
                TASKS,
                "--output",
                out,
                "--log_samples",
            ]
        )
    assert code == 0
    saved = json.loads(open(out).read())
    # Params restored fsdp-sharded over the 8 devices score as on one device.
    for ours, ref in zip(saved["samples"]["tiny_mc"], evaluated["samples"]["tiny_mc"], strict=True):
        np.testing.assert_allclose(
            [r[0][0] for r in ours["resps"]], [r[0][0] for r in ref["resps"]], atol=1e-5
        )
    assert open(out[: -len(".json")] + ".md").read() in capsys.readouterr().out
    # A missing workdir is one line, exit 2 (an unknown task is the same ValueError path).
    assert eval_cli.main(["--workdir", str(tmp_path / "none"), "--tasks", "tiny_mc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sft-jax-eval: ") and "no checkpoints" in err[0]
