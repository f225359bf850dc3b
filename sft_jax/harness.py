"""Standard benchmarks through lm-evaluation-harness (`pip install -e .[eval]`): an `LM`
adapter for sft_jax models, and `run_tasks`, which runs the harness's own task definitions
(gsm8k, ifeval, mmlu, or a local YAML task) on a model and its params.

    results = harness.run_tasks(model_cfg, params, tokenizer, spec, ["tiny_mc"],
                                include_path="tests/data/harness")
    print(harness.results_markdown(results))

Log-likelihoods are scored packed: several (context, continuation) sequences share a row,
each with its own segment id and positions from 0 (the training contract), so short
multiple-choice requests fill the rows instead of padding them; one jitted forward per
batch of rows, on the mesh the params live on. Generation is the KV-cache `Generator`.
`apply_chat_template` renders with the run's own template (`data.template`), exactly as
training put text before a response.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from tqdm.auto import tqdm

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # the optional extra
    raise ImportError(
        "sft_jax.harness needs lm-evaluation-harness: pip install -e '.[eval]' (or pip install "
        "lm-eval)"
    ) from e

from sft_jax import data as data_lib
from sft_jax import kernels, sharding
from sft_jax.generate import BUCKET, Generator, Sampling, end_token_ids
from sft_jax.model import GPT, GPTConfig, LoraLayers

log = logging.getLogger(__name__)

_PLACEHOLDER = "x"  # the assistant turn whose start the generation prompt ends at
_SEARCH_ROWS = 16  # packing looks for room in this many most recently opened rows
_SAMPLING_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}


def _round_up(n: int, k: int) -> int:
    return -(-n // k) * k


@functools.lru_cache(maxsize=8)
def _scorer(cfg: GPTConfig, lora: LoraLayers | None):
    """Jitted (params, tokens, positions, segments, targets) → (log p(target) [rows, width]
    float32, target is the argmax [rows, width] bool); only these leave the device."""
    model = GPT(cfg, lora)

    def score(params, tokens, positions, segments, targets):
        logits = model.apply({"params": params}, tokens, positions=positions, segment_ids=segments)
        target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        logp = target_logit - jax.nn.logsumexp(logits, axis=-1)
        return logp, jnp.argmax(logits, axis=-1) == targets

    return jax.jit(score)


def pack(lengths: Sequence[int], width: int) -> list[list[int]]:
    """Indices of `lengths` in rows whose lengths sum to ≤ `width`: longest first, each into
    the first of the last few open rows with room (first-fit decreasing, bounded search)."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if lengths[i] > width:
            raise ValueError(f"pack: a sequence of {lengths[i]} tokens exceeds rows of {width}")
        first = max(0, len(rows) - _SEARCH_ROWS)
        r = next((r for r in range(first, len(rows)) if room[r] >= lengths[i]), None)
        if r is None:
            rows.append([])
            room.append(width)
            r = len(rows) - 1
        rows[r].append(i)
        room[r] -= lengths[i]
    return rows


@dataclasses.dataclass
class _Packed:
    """Host arrays of packed rows, and where each sequence's scored targets lie."""

    tokens: np.ndarray  # [rows, width] int32; positions, segments, targets alike
    positions: np.ndarray
    segments: np.ndarray
    targets: np.ndarray
    spans: list[tuple[int, int, int]]  # per sequence: (row, first scored slot, end)


def _lay_out(sequences: Sequence[tuple[list[int], int]], width: int, rows_multiple: int):
    """Packs (input ids, scored count) sequences; the row count is a multiple of
    `rows_multiple` (empty rows: segment 0, attend to nothing, never read)."""
    rows = pack([len(ids) - 1 for ids, _ in sequences], width)
    shape = (_round_up(max(len(rows), 1), rows_multiple), width)
    out = _Packed(*(np.zeros(shape, np.int32) for _ in range(4)), spans=[None] * len(sequences))
    for r, members in enumerate(rows):
        at = 0
        for segment, i in enumerate(members, start=1):
            ids, scored = sequences[i]
            n = len(ids) - 1  # inputs: every token but the last; targets: every but the first
            out.tokens[r, at : at + n] = ids[:-1]
            out.targets[r, at : at + n] = ids[1:]
            out.positions[r, at : at + n] = np.arange(n)
            out.segments[r, at : at + n] = segment
            out.spans[i] = (r, at + n - scored, at + n)
            at += n
    return out


class SftJaxLM(TemplateLM):
    """An lm-eval model over an sft_jax `GPTConfig` and its params (a run's checkpoint, an
    imported Hugging Face folder, or the state of a run in progress).

    `spec`: the run's DataSpec, whose template `apply_chat_template` renders with (None:
    the tokenizer's chat template if it has one, else alpaca). `batch_size`: rows per forward
    (packed, `max_length` tokens at most each) and prompts per generation batch; rounded up
    to a multiple of the mesh's batch axes when the params are sharded. `lora`: the LoRA
    adapters the params carry (`Run.lora_layers`), applied beside their kernels.
    """

    def __init__(
        self,
        cfg: GPTConfig,
        params,
        tokenizer,
        spec=None,
        batch_size: int = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        seed: int = 0,
        lora: LoraLayers | None = None,
    ):
        super().__init__()
        self.cfg, self.tokenizer, self._spec, self._lora = cfg, tokenizer, spec, lora
        self.params = jax.device_put(params)  # on the device once, as Generator does
        self._placement, multiple = _batch_placement(self.params)
        self.batch_size = _round_up(max(batch_size, 1), multiple)
        self._max_length = max_length or cfg.max_seq_len
        self.max_gen_toks, self.seed = max_gen_toks, seed
        self._generator: Generator | None = None
        self._bos = data_lib.bos_to_prepend(tokenizer)

    def get_model_info(self) -> dict:
        """What lm-eval records of the model in the results' config."""
        return {
            "model_family": self.cfg.family,
            "model_num_parameters": self.cfg.num_params(),
            "model_dtype": self.cfg.dtype,
            "max_length": self.max_length,
        }

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is: BOS where the tokenizer has one (GPT-2: its EOS)."""
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else bos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kw) -> list[int]:
        """Ids of `string`; a BOS first where training put one (unless `add_special_tokens`
        is False, or the text, e.g. a rendered chat template, already starts with it)."""
        ids = self.tokenizer.encode(string, add_special_tokens=False)
        if add_special_tokens is not False and self._bos is not None and ids[:1] != [self._bos]:
            ids = [self._bos, *ids]
        return ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # ------------------------------------------------------------------ log-likelihoods

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs):
        """(Σ log p(continuation | context), continuation is the greedy one) per request."""
        sequences = []
        for _, context, continuation in requests:
            ids = (context + continuation)[-(self.max_length + 1) :]
            sequences.append((ids, len(continuation)))
        answers = self.score(sequences, disable_tqdm)
        for (key, _, _), answer in zip(requests, answers, strict=True):
            self.cache_hook.add_partial("loglikelihood", key, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Σ log p of each whole text, in windows of `max_length` tokens, every token
        predicted once (lm-eval's rolling windows), all windows of all texts in one pass."""
        sequences, owner = [], []
        for n, (text,) in enumerate(req.args for req in requests):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            for context, continuation in map(make_disjoint_window, windows):
                sequences.append((context + continuation, len(continuation)))
                owner.append(n)
        totals = [0.0] * len(requests)
        for n, (logp, _) in zip(owner, self.score(sequences, disable_tqdm), strict=True):
            totals[n] += logp
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def score(
        self, sequences: Sequence[tuple[list[int], int]], disable_tqdm: bool = True
    ) -> list[tuple[float, bool]]:
        """(Σ log p of the last `scored` tokens, each of them the argmax) per (ids, scored)
        sequence (ids: at most max_length + 1 tokens). Every batch is dispatched before
        the host waits for the first; the progress bar counts the batches as they finish."""
        if not sequences:
            return []
        longest = max(len(ids) - 1 for ids, _ in sequences)
        multiple = _width_multiple(self.cfg)
        width = _round_up(min(longest, self.max_length), multiple)
        packed = _lay_out(sequences, width, self.batch_size)
        fn = _scorer(self.cfg, self._lora)
        outs = []
        for start in range(0, packed.tokens.shape[0], self.batch_size):
            part = slice(start, start + self.batch_size)
            arrays = [packed.tokens, packed.positions, packed.segments, packed.targets]
            outs.append(fn(self.params, *(self._place(a[part]) for a in arrays)))
        outs = [jax.device_get(o) for o in tqdm(outs, "Scoring rows", disable=disable_tqdm)]
        logp = np.concatenate([o[0] for o in outs])
        greedy = np.concatenate([o[1] for o in outs])
        return [
            (float(logp[r, a:b].sum(dtype=np.float64)), bool(greedy[r, a:b].all()))
            for r, a, b in packed.spans
        ]

    def _place(self, x: np.ndarray):
        return x if self._placement is None else jax.device_put(x, self._placement)

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, `do_sample`) continuations, cut at the first `until` string.
        Requests with the same generation settings decode together, one compiled shape."""
        groups: dict[str, list[int]] = {}
        for n, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(n)
        out: list[str] = [""] * len(requests)
        for members in groups.values():
            contexts = [requests[n].args[0] for n in members]
            texts = self._generate(contexts, requests[members[0]].args[1], disable_tqdm)
            for n, text in zip(members, texts, strict=True):
                out[n] = text
                self.cache_hook.add_partial("generate_until", requests[n].args, text)
        return out

    def _generate(self, contexts: Sequence[str], gen_kwargs: dict, disable_tqdm: bool):
        sampling, until = self._sampling(gen_kwargs)
        keep = max(self.max_length - sampling.max_new_tokens, 1)
        # An empty context (no BOS to prepend) is the prefix token, as in loglikelihood.
        prompts = [self.tok_encode(c)[-keep:] or [self.prefix_token_id] for c in contexts]
        if self._generator is None:
            ends = end_token_ids(self.tokenizer)
            self._generator = Generator(self.cfg, self.params, ends, lora=self._lora)
        width = max(len(p) for p in prompts)  # one padded width: one compile for the group
        texts = []
        starts = range(0, len(prompts), self.batch_size)
        for start in tqdm(starts, "Generating", disable=disable_tqdm):
            batch = prompts[start : start + self.batch_size]
            full = batch + [batch[-1]] * (self.batch_size - len(batch))  # the same shape again
            news = self._generator.generate(
                full, sampling, stop=until, tokenizer=self.tokenizer, min_width=width
            )
            texts += [_cut(self.tok_decode(new), until) for new in news[: len(batch)]]
        return texts

    def _sampling(self, gen_kwargs: dict) -> tuple[Sampling, list[str]]:
        unknown = set(gen_kwargs) - _SAMPLING_KEYS
        if unknown:
            log.warning("generate_until: ignoring generation settings %s", sorted(unknown))
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [s for s in until if s]
        sampled = bool(gen_kwargs.get("do_sample", False))
        sampling = Sampling(
            max_new_tokens=int(gen_kwargs.get("max_gen_toks", self.max_gen_toks)),
            temperature=float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
            top_k=int(gen_kwargs.get("top_k") or 0),
            top_p=float(gen_kwargs.get("top_p") or 1.0),
            seed=self.seed,
        )
        return sampling, until

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt=True) -> str:
        """The conversation as the run's template renders it before a response: up to the
        assistant turn's first character (`add_generation_prompt`), or, continuing the
        last (assistant) message, up to its end. Empty turns (a perplexity task's empty
        question) are left out: the data checks refuse them, as training did."""
        if not add_generation_prompt and (
            not chat_history or chat_history[-1]["role"] != "assistant"
        ):
            raise ValueError(
                "apply_chat_template: nothing to continue; the last turn must be the assistant's"
            )
        earlier = chat_history if add_generation_prompt else chat_history[:-1]
        started = "" if add_generation_prompt else chat_history[-1]["content"]
        turns = [m for m in earlier if m["content"]]
        turns.append({"role": "assistant", "content": started or _PLACEHOLDER})
        spec = dataclasses.replace(self.spec, format="messages", fields="")
        enc = data_lib.make_encoder(spec, self.tokenizer, self._template(), "messages")
        rendered = enc.render_examples(enc.messages({"messages": turns}))[-1]
        return rendered.text[: rendered.spans[-1][0] + len(started)]

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        """The template's identity (recorded in the results when a chat template is used)."""
        return data_lib.template_id(self._template()) if chat_template else None

    @property
    def spec(self):
        if self._spec is None:
            template = "tokenizer" if self.tokenizer.chat_template else "alpaca"
            self._spec = data_lib.DataSpec(train="-", format="auto", template=template)
        return self._spec

    def _template(self):
        return data_lib.resolve_template(self.spec, self.tokenizer)


def _cut(text: str, until: Sequence[str]) -> str:
    for s in until:
        text = text.split(s)[0]
    return text


def _width_multiple(cfg: GPTConfig) -> int:
    """Rows are a multiple of this wide: whole blocks for TPU splash attention (the kernel
    takes no other), else the generator's bucket (few shapes, few compiles)."""
    kernel = kernels.resolve(
        cfg.attention, dtype=cfg.dtype, softcap=cfg.attn_softcap, sinks=cfg.attention_sinks
    )
    return kernels.SPLASH_BLOCK if kernel == "splash" else BUCKET


def _batch_placement(params):
    """(sharding for batch rows, the row multiple it needs) on the mesh the params are
    sharded over; (None, 1) for params on one device."""
    leaf = jax.tree.leaves(params)[0]
    named = getattr(leaf, "sharding", None)
    if not isinstance(named, jax.sharding.NamedSharding) or named.mesh.size == 1:
        return None, 1
    rows = int(np.prod([named.mesh.shape[a] for a in sharding.BATCH_AXES]))
    return sharding.batch_sharding(named.mesh), rows


# ---------------------------------------------------------------------- running tasks


def run_tasks(
    cfg: GPTConfig,
    params,
    tokenizer,
    spec,
    tasks: Sequence[str],
    *,
    include_path: str | Sequence[str] | None = None,
    limit: float | None = None,
    num_fewshot: int | None = None,
    apply_chat_template: bool = False,
    fewshot_as_multiturn: bool = True,
    batch_size: int = 8,
    log_samples: bool = False,
    bootstrap_iters: int = 1000,
    seed: int = 0,
    lora: LoraLayers | None = None,
) -> dict:
    """lm-eval's `simple_evaluate` of `tasks` (names, or local YAML tasks found under
    `include_path`) on the model; its results dict, made JSON-serializable. `limit`: at
    most this many documents per task (a fraction below 1). Raises ValueError naming
    unknown tasks."""
    from lm_eval import simple_evaluate

    manager = check_tasks(tasks, include_path)
    lm = SftJaxLM(cfg, params, tokenizer, spec, batch_size=batch_size, seed=seed, lora=lora)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        apply_chat_template=apply_chat_template,
        fewshot_as_multiturn=fewshot_as_multiturn,
        log_samples=log_samples,
        bootstrap_iters=bootstrap_iters,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    return _plain(results)


def check_tasks(tasks: Sequence[str], include_path: str | Sequence[str] | None = None):
    """lm-eval's TaskManager that knows every one of `tasks`; a ValueError naming the
    unknown ones otherwise. Cheap where the tasks are all local (under `include_path`):
    lm-eval's own index (5-15 s) is built only when needed. Call it before a training run,
    so that a misspelt task stops the run before it trains."""
    paths = (include_path,) if isinstance(include_path, str) else tuple(include_path or ())
    for path in paths:
        if not os.path.isdir(path):
            raise ValueError(f"harness include_path {path!r} is not a folder of YAML tasks")
    manager = _task_manager(paths, builtin=False)  # local tasks alone: no need for the index
    if not paths or any(t not in manager.all_tasks for t in tasks):
        manager = _task_manager(paths, builtin=True)
    require_known(tasks, manager, paths)
    return manager


def require_known(tasks: Sequence[str], manager, include_paths: Sequence[str]) -> None:
    """Raises ValueError naming the tasks `manager` (a TaskManager) does not know."""
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        where = f" (nor under include_path {', '.join(include_paths)})" if include_paths else ""
        raise ValueError(
            f"lm-eval knows no task {', '.join(map(repr, unknown))}{where}; name tasks of "
            "`lm-eval ls tasks` or give the folder of a YAML task as include_path"
        )


@functools.lru_cache(maxsize=4)
def _task_manager(include_paths: tuple[str, ...], builtin: bool):
    """lm-eval's index of the tasks under `include_paths` and (`builtin`) of its own ~200
    task folders (5-10 s), built once per process: a run evaluates before and after
    training with the same one."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=list(include_paths) or None, include_defaults=builtin)


def _plain(results: dict) -> dict:
    """The results as JSON types (numpy scalars, task functions and the like as text)."""
    from lm_eval.utils import handle_non_serializable

    return json.loads(json.dumps(results, default=handle_non_serializable))


def scores(results: dict) -> dict[tuple[str, str], tuple[float, float | None]]:
    """{(task, metric[,filter]): (value, stderr or None)} of a results dict, groups included."""
    out = {}
    for section in ("results", "groups"):
        for task, metrics in results.get(section, {}).items():
            for key, value in metrics.items():
                if "," not in key or "_stderr" in key or not isinstance(value, int | float):
                    continue
                metric, filt = key.split(",", 1)
                name = metric if filt == "none" else f"{metric} ({filt})"
                stderr = metrics.get(f"{metric}_stderr,{filt}")
                out[(task, name)] = (value, stderr if isinstance(stderr, int | float) else None)
    return out


def _fmt(score: tuple[float, float | None] | None) -> str:
    if score is None:
        return "–"
    value, stderr = score
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def results_markdown(results: dict, title: str = "Benchmarks (lm-evaluation-harness)") -> str:
    """One row per task and metric: the value ± its standard error."""
    lines = [f"## {title}", "", "| task | metric | value |", "|---|---|---|"]
    for (task, metric), score in scores(results).items():
        lines.append(f"| {task} | {metric} | {_fmt(score)} |")
    return "\n".join(lines) + "\n"


def before_after_markdown(
    before: dict, after: dict, title: str = "Benchmarks before and after fine-tuning"
) -> str:
    """The same tasks' scores side by side: before, after, and the change."""
    b, a = scores(before), scores(after)
    lines = [f"## {title}", "", "| task | metric | before | after | change |", "|---" * 5 + "|"]
    for key in dict.fromkeys([*b, *a]):
        change = f"{a[key][0] - b[key][0]:+.4f}" if key in a and key in b else "–"
        cells = [*key, _fmt(b.get(key)), _fmt(a.get(key)), change]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------- a training run


def evaluate_run(
    workdir: str, name: str, cfg: GPTConfig, params, tokenizer, spec, tasks, **options
) -> dict:
    """`run_tasks` for a run before or after training (`name`): the results are saved as
    `harness_{name}.json` in the workdir (a local path or bucket URL), where
    `report_markdown` finds them, a resumed run's "before" included. `options`: those of
    run_tasks (include_path, limit, num_fewshot, apply_chat_template, batch_size, lora …)."""
    results = run_tasks(cfg, params, tokenizer, spec, tasks, **options)
    if jax.process_index() == 0:
        text = json.dumps(results, indent=2)
        epath.Path(workdir, f"harness_{name}.json").write_text(text, encoding="utf-8")
    log.info("harness %s training:\n%s", name, results_markdown(results))
    return results


def report_markdown(workdir: str) -> str:
    """The run's saved harness results as a Markdown section: before and after side by
    side, or whichever of the two exists; "" when neither does."""
    saved = {}
    for name in ("before", "after"):
        path = epath.Path(workdir, f"harness_{name}.json")
        if path.exists():
            saved[name] = json.loads(path.read_text(encoding="utf-8"))
    if len(saved) == 2:
        return before_after_markdown(saved["before"], saved["after"])
    if saved:
        ((name, results),) = saved.items()
        return results_markdown(results, f"Benchmarks {name} fine-tuning")
    return ""
