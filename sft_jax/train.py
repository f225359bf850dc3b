"""The one orchestrator, in flax's lm1b shape: `setup` (config → mesh → data →
model/optimizer → abstract state → shardings → restore or init → jitted steps) returns a
few named things; `train_and_evaluate` runs a flat loop over them whose periodic work lives
in small objects: `metrics.MetricsWindow`, `preemption.SavePolicy`, `evaluate.Evaluation`.

Init order (big_vision's): resume from the workdir's latest checkpoint > pretrained
weights (`model.init_from`) > random init. No math here; it lives in steps/losses/model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from sft_jax import checkpoint as ckpt_lib
from sft_jax import config as config_lib
from sft_jax import data as data_lib
from sft_jax import (
    early_stopping,
    hf,
    lora,
    optim,
    paths,
    peft_adapter,
    preemption,
    runs,
    sharding,
    steps,
)
from sft_jax import evaluate as evaluate_lib
from sft_jax import metrics as metrics_lib
from sft_jax.model import GPT, GPTConfig
from sft_jax.run_meta import RunMeta


def process_rows(batch_sharding, global_rows: int) -> np.ndarray:
    """Positions in a global batch of `global_rows` of the rows this process's devices hold:
    their shards' row ranges, deduplicated, in order (the layout
    `make_array_from_process_local_data` expects). Processes whose devices hold the same
    shards, as when a mesh axis that does not split the batch (tensor) spans hosts, get the
    same rows; on TPU pods a process's rows need not be one contiguous block."""
    index_map = batch_sharding.addressable_devices_indices_map((global_rows,))
    ranges = sorted(
        {(r.start or 0, global_rows if r.stop is None else r.stop) for r, *_ in index_map.values()}
    )
    return np.concatenate([np.arange(a, b) for a, b in ranges])


def global_batch(local: dict[str, np.ndarray], batch_sharding, global_rows: int) -> dict:
    """This process's rows (at `process_rows`) → one global jax.Array per field, sharded
    over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v, (global_rows, *v.shape[1:]))
        for k, v in local.items()
    }


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The state's layout on the mesh and the jitted functions that use it."""

    model: GPT
    mesh: jax.sharding.Mesh
    rules: tuple  # logical axis rules for activations, active while tracing
    abstract_state: steps.TrainState  # ShapeDtypeStructs
    state_shardings: steps.TrainState  # NamedShardings, same tree
    batch_sharding: jax.sharding.NamedSharding
    # The float params (without LoRA adapters) that pretrained weights load into: the
    # state's params, or with LoRA its base before `lora.prepare_base` (dtype, quantization).
    load_shapes: dict
    load_shardings: dict
    init: Callable  # rng -> TrainState, laid out by state_shardings
    # (loaded params, rng) -> TrainState around them; with LoRA, params are the base as
    # the state stores it (`_pretrained` casts and quantizes as it loads).
    init_from_params: Callable
    train_step: Callable  # (state, batch) -> (state, metrics); state donated
    eval_step: Callable  # (params, batch) -> {loss_sum, loss_tokens}

    def saved_target(self):
        """What a checkpoint of this run holds, as restore targets (shapes with shardings):
        the state, or with LoRA the state without its frozen base."""
        return ckpt_lib.abstract_with_shardings(
            steps.saved(self.abstract_state, self.model),
            steps.saved(self.state_shardings, self.model),
        )

    @contextlib.contextmanager
    def context(self):
        """Call (and so trace) the functions inside this: mesh and rules for constraints."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def build_steps(
    model: GPT, tx, schedule, mesh, micro_steps: int = 1, label_smoothing: float = 0.0
) -> StepFns:
    """Shapes before arrays: eval_shape the init, derive every leaf's sharding from the
    logical axis rules, then jit init and steps with those shardings."""
    cfg = model.cfg
    init_fn = functools.partial(steps.init_state, model=model, tx=tx)
    boxed_abstract = jax.eval_shape(init_fn, jax.random.key(0))
    state_shardings = sharding.tree_shardings(boxed_abstract, mesh)
    boxed_load = jax.eval_shape(
        functools.partial(steps.init_params, model=model), jax.random.key(0)
    )
    boxed_load = lora.split(boxed_load)[0]
    load_shardings = sharding.tree_shardings(boxed_load, mesh)
    stored_base = lora.split(state_shardings.params)[0]  # with LoRA: the base as stored
    batch_sharding = sharding.batch_sharding(mesh)
    sizes = {"act_heads": cfg.n_heads, "act_mlp": cfg.d_ff, "act_vocab": cfg.vocab_size}
    train_step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        micro_steps=micro_steps,
        label_smoothing=label_smoothing,
        dropout=cfg.dropout > 0 or cfg.neftune_alpha > 0,  # an rng: dropout, NEFTune noise
    )
    return StepFns(
        model=model,
        mesh=mesh,
        rules=sharding.activation_rules(mesh, sizes),
        abstract_state=nn.meta.unbox(boxed_abstract),
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        load_shapes=nn.meta.unbox(boxed_load),
        load_shardings=load_shardings,
        init=jax.jit(lambda rng: nn.meta.unbox(init_fn(rng)), out_shardings=state_shardings),
        init_from_params=jax.jit(
            functools.partial(steps.state_from_params, tx=tx, model=model),
            in_shardings=(load_shardings if model.lora is None else stored_base, None),
            out_shardings=state_shardings,
            donate_argnums=0,
        ),
        train_step=jax.jit(
            train_step,
            in_shardings=(state_shardings, batch_sharding),
            out_shardings=(state_shardings, None),
            donate_argnums=0,
        ),
        eval_step=jax.jit(
            functools.partial(steps.eval_step, model=model),
            in_shardings=(state_shardings.params, batch_sharding),
        ),
    )


@dataclasses.dataclass(frozen=True)
class Setup:
    """Everything the loop needs, built before its first step."""

    run: config_lib.RunConfig
    model_cfg: GPTConfig
    tokenizer: object
    data_spec: data_lib.DataSpec
    splits: data_lib.DataSplits
    num_steps: int
    fns: StepFns
    checkpointer: ckpt_lib.Checkpointer
    meta: RunMeta  # saved beside every checkpoint: config, model config, tokenizer, base
    state: steps.TrainState
    start_step: int


def setup(run: config_lib.RunConfig, workdir: str) -> Setup:
    """Shapes and data before arrays; then the state: resumed, pretrained or random.
    What the config names is read here, after parsing: init_from's config.json, the
    harness tasks, the tokenizer, the data."""
    if run.train.compilation_cache_dir:  # before the first compile
        jax.config.update("jax_compilation_cache_dir", run.train.compilation_cache_dir)
    model_cfg = config_lib.model_config(run, hf.load_config)
    mesh = sharding.make_mesh(**dataclasses.asdict(run.mesh))
    config_lib.check(run, model_cfg, dict(mesh.shape))
    if run.eval.harness_task_list:  # a misspelt task stops the run before it trains
        from sft_jax import harness  # needs the optional lm-eval (the eval extra)

        harness.check_tasks(run.eval.harness_task_list, run.eval.harness_include_path or None)
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())

    # Data: rows → token ids + masks → packed rows, once; batches are step-indexed.
    tokenizer = data_lib.load_tokenizer(run.model.tokenizer)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"config: the tokenizer {run.model.tokenizer!r} has {len(tokenizer)} tokens but the "
            f"model ({run.model.init_from or run.model.preset}) only "
            f"{model_cfg.vocab_size}; set model.tokenizer to the model's own (or leave it '')"
        )
    data_spec = run.data
    if jax.process_count() > 1 and data_spec.cache and not data_spec.cache_dir:
        # Built once across hosts: each tokenizes its share into a folder all of them read.
        data_spec = dataclasses.replace(data_spec, cache_dir=f"{workdir.rstrip('/')}/data_cache")
    splits = data_lib.build_splits(data_spec, tokenizer, data_lib.jax_processes())
    logging.debug("data: %s", splits.stats)  # everything, for --verbosity=1
    if jax.process_index() == 0:
        print(metrics_lib.data_table(splits.stats), flush=True)
    batches = data_lib.num_batches_per_epoch(splits.train, run.train.batch_size)
    num_steps = config_lib.total_steps(run.train, batches)

    # Model, optimizer, and the state's shapes and shardings before any array exists.
    tx, schedule = optim.make_optimizer(run.optim, num_steps)
    model = GPT(model_cfg, run.lora.layers(model_cfg))
    t = run.train
    fns = build_steps(model, tx, schedule, mesh, t.micro_steps, t.label_smoothing)
    best = ckpt_lib.BestMetric.parse(run.checkpoint.keep_best)
    checkpointer = ckpt_lib.Checkpointer(
        workdir, run.checkpoint.keep, run.checkpoint.async_save, writer=True, best=best
    )
    if jax.process_index() == 0:  # the tokenizer travels with the run: export and generation
        data_lib.save_tokenizer(tokenizer, paths.join(workdir, "tokenizer"))
    meta = RunMeta(
        config=run.as_json,
        model=model_cfg,
        tokenizer=run.model.tokenizer,
        template=run.data.template,
        init_from=run.model.init_from,
        seed=run.seed,
        lora=run.lora if run.lora.enabled else None,
    )
    state = _initial_state(run, fns, checkpointer, meta)
    return Setup(
        run=run,
        model_cfg=model_cfg,
        tokenizer=tokenizer,
        data_spec=data_spec,
        splits=splits,
        num_steps=num_steps,
        fns=fns,
        checkpointer=checkpointer,
        meta=meta,
        state=state,
        start_step=int(jax.device_get(state.step)),
    )


def _initial_state(
    run: config_lib.RunConfig, fns: StepFns, checkpointer, meta: RunMeta
) -> steps.TrainState:
    """The workdir's latest good checkpoint, else pretrained weights, else random init.
    A LoRA checkpoint holds the adapters: the frozen base comes back from its source,
    rebuilt outside `fns.context()`: its abstract shapes keep their logical axis names,
    which under the activation rules would become sharding constraints."""
    with fns.context():
        resumed = checkpointer.restore_latest_good(
            fns.saved_target(),
            validate=lambda saved: meta.check_resumable(saved, checkpointer.directory),
        )
    source = run.model.init_from
    if resumed is not None:
        logging.info("resumed from %s at step %d", checkpointer.directory, resumed[2])
        if fns.model.lora is None:
            return resumed[0]
        allow_pickle = run.model.allow_pickle
        base = runs.frozen_base(fns.model, fns.mesh, source, run.seed, allow_pickle)
        return steps.with_base(resumed[0], base)
    with fns.context():
        rng = jax.random.key(run.seed)
        if not source:
            return fns.init(rng)
        params = _pretrained(run.model, fns)
        state = fns.init_from_params(params, rng)
        if not run.lora_init_from:
            return state
        return _with_peft_adapters(state, run.lora_init_from, fns, run.lora)


def _with_peft_adapters(
    state: steps.TrainState, folder: str, fns: StepFns, spec: lora.LoraSpec
) -> steps.TrainState:
    """`state` with the adapters of the PEFT folder `folder` (`lora.init_from`), which
    must be what the `lora.*` settings (`spec`) describe."""
    cfg = fns.model.cfg
    adapter = peft_adapter.read_peft_adapter(folder, cfg)
    peft_adapter.check_same_adapter(cfg, adapter.spec, spec, folder)
    base, fresh = lora.split(state.params)
    shardings = lora.split(fns.state_shardings.params)[1]
    adapters = jax.tree.map(
        lambda x, s, f: jax.device_put(x.astype(f.dtype), s), adapter.adapters, shardings, fresh
    )
    logging.info("LoRA adapters from %s (PEFT, base %r)", folder, adapter.base_model_name_or_path)
    return state.replace(params=lora.combine(base, adapters))


def _pretrained(m: config_lib.ModelSection, fns: StepFns) -> dict:
    """The pretrained params of model.init_from (without LoRA adapters), laid out for the
    mesh; with LoRA, the frozen base as the state stores it (`lora.prepare_base`), each
    leaf (each layer of a stacked leaf) cast and quantized as it loads: a QLoRA import
    holds the quantized base and one float tensor, never the float base."""
    source, cfg = m.init_from, fns.model.cfg
    transform = None
    if fns.model.lora is not None:
        stored = lora.split(fns.state_shardings.params)[0]  # init_from_params takes these
        transform = lora.load_transform(cfg, fns.model.lora, stored)
    _, params = hf.load_hf(
        source,
        allow_pickle=m.allow_pickle,
        param_dtype=cfg.param_dtype,
        scan_layers=cfg.scan_layers,
        # Each process reads only the blocks of the params its own devices hold.
        shardings=fns.load_shardings,
        shapes=fns.load_shapes,
        transform=transform,
    )
    logging.info("initialised from pretrained weights %s", source)
    return params


def _export(s: Setup, workdir: str, params) -> None:
    """The export.* folders of the final params: the model (merged with LoRA adapters) in
    Hugging Face format, and a LoRA run's adapters as a PEFT folder."""
    export_cfg, spec = s.run.export, s.run.lora
    if export_cfg.hf_dir:
        out = paths.under(workdir, export_cfg.hf_dir)
        hf.save_hf(
            s.model_cfg,
            lora.merged(params, spec, s.model_cfg),
            out,
            tokenizer=s.tokenizer,
            dtype=hf.export_dtype(s.model_cfg, export_cfg.dtype),
        )
        logging.info("exported the final params to %s (Hugging Face format)", out)
    if export_cfg.adapter_dir:
        out = paths.under(workdir, export_cfg.adapter_dir)
        adapters = lora.split(params)[1]
        peft_adapter.write_peft_adapter(s.model_cfg, spec, adapters, out, s.run.model.init_from)
        logging.info("exported the LoRA adapters to %s (PEFT format)", out)


def train_and_evaluate(
    config: ml_collections.ConfigDict | config_lib.RunConfig, workdir: str
) -> dict[str, float]:
    """Train per `config` (parsed here if it is a ConfigDict: the edge), writing metrics,
    events and checkpoints under `workdir`.

    Returns the last logged metrics (and the final evaluation)."""
    run = config if isinstance(config, config_lib.RunConfig) else config_lib.RunConfig.parse(config)
    s = setup(run, workdir)
    t, fns, checkpointer, state = run.train, s.fns, s.checkpointer, s.state
    eval_batch_size = t.eval_batch_size or t.batch_size
    evaluation = evaluate_lib.Evaluation(
        workdir,
        run.eval,
        run.seed,
        s.data_spec,
        s.tokenizer,
        s.model_cfg,
        s.splits.validation,
        batch_size=eval_batch_size,
        max_batches=t.eval_steps,
        process_rows=process_rows(fns.batch_sharding, eval_batch_size),
        lora=fns.model.lora,
        validation_sources=s.splits.validation_sources,
        eval_fn=lambda p, local: fns.eval_step(
            p, global_batch(local, fns.batch_sharding, eval_batch_size)
        ),
    )
    peak, peak_source = metrics_lib.peak_flops_per_device(t.peak_flops)
    logging.info("peak %.3g FLOP/s per device (%s); %d steps", peak, peak_source, s.num_steps)
    logger = metrics_lib.MetricsLogger(
        workdir, t, s.num_steps, s.start_step, jax.process_index() == 0, run.as_json
    )
    ckpt_cfg = run.checkpoint
    profiler = metrics_lib.StepProfiler(
        paths.join(workdir, "profile"), t.profile_start, t.profile_steps
    )
    record: dict[str, float] = {}
    try:
        if s.start_step == 0:  # the starting point, so the report shows what training changed
            evaluation.generations_before(state.params)
        with fns.context(), preemption.StopSignal() as stop:
            if s.start_step == 0 and s.splits.validation is not None:
                logger.write(0, evaluation.validation_loss(state.params))
            policy = preemption.SavePolicy(
                ckpt_cfg.save_every, ckpt_cfg.save_every_seconds, s.num_steps, stop
            )
            lora_on = fns.model.lora is not None  # a frozen base: no weight gradients
            window = metrics_lib.MetricsWindow(
                lambda width: s.model_cfg.flops_per_token(width, lora_on) * width,
                t.batch_size,
                peak * fns.mesh.size,
            )
            mine = process_rows(fns.batch_sharding, t.batch_size)
            stopper = early_stopping.EarlyStopping.for_run(
                t, ckpt_cfg, checkpointer, s.start_step, s.splits.validation is not None
            )
            last = s.start_step if stopper.stopped else s.num_steps  # it had stopped early
            for step in range(s.start_step, last):
                local = data_lib.batch_at(s.splits.train, step, t.batch_size, run.seed, mine)
                profiler.before(step)
                state, device_metrics = fns.train_step(
                    state, global_batch(local, fns.batch_sharding, t.batch_size)
                )
                done = step + 1
                profiler.after(done, device_metrics)
                window.add(done, device_metrics, local["tokens"].shape[1])
                logging_now = preemption.due(t.log_every, done, s.num_steps)
                evaluating = s.splits.validation is not None and preemption.due(
                    t.eval_every, done, s.num_steps
                )
                saving, stopping = policy.decide(done)
                if not (logging_now or evaluating or saving):
                    continue
                window.read()  # a non-finite step stops the run here, before any save
                record = window.record() if logging_now else {}
                early = False
                with window.paused():  # evaluating and saving are not training time
                    if evaluating:
                        record.update(evaluation.validation_loss(state.params))
                        early = stopper.observe(done, record)
                        saving = saving or early or checkpointer.improves(record)
                    if record:
                        logger.write(done, record)
                        logger.progress(done, record.get("loss"), record.get("tokens_per_sec"))
                    if saving and checkpointer.latest_step() != done:
                        meta = s.meta.to_json() | stopper.meta()
                        checkpointer.save(done, steps.saved(state, fns.model), meta, record=record)
                        policy.saved()
                if stopping:
                    logging.warning(
                        "stopped at step %d of %d on request; checkpoint saved in %s/%d. Run the "
                        "same command to resume.",
                        done,
                        s.num_steps,
                        checkpointer.directory,
                        done,
                    )
                    return record
                if early:
                    break  # `stopper` said why; the run ends as a finished one
        evaluation.finish(state.params)
        checkpointer.wait()  # the export follows only a committed final checkpoint
        _export(s, workdir, state.params)
        logging.info("done: step %d, checkpoints in %s", s.num_steps, checkpointer.directory)
    finally:
        profiler.close()
        checkpointer.close()  # waits for the last (async) save
        logger.close()
    return record
