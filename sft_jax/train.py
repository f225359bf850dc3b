"""The one orchestrator: config → mesh → data → model/optimizer → abstract state →
shardings → restore or init → jitted steps → loop (log, evaluate, checkpoint).

Init order (big_vision's): resume from the workdir's latest checkpoint > pretrained
weights (`model.init_from`) > random init. No math here; it lives in steps/losses/model.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging

from sft_jax import checkpoint as ckpt_lib
from sft_jax import config as config_lib
from sft_jax import data as data_lib
from sft_jax import evaluate as evaluate_lib
from sft_jax import hf, optim, preemption, sharding, steps
from sft_jax import judge as judge_lib
from sft_jax import metrics as metrics_lib
from sft_jax.generate import Generator, Sampling, end_token_ids
from sft_jax.model import GPT


def global_batch(local: dict[str, np.ndarray], batch_sharding, global_rows: int) -> dict:
    """This process's rows → one global jax.Array per field, sharded over (data, fsdp)."""
    return {
        k: jax.make_array_from_process_local_data(batch_sharding, v, (global_rows, *v.shape[1:]))
        for k, v in local.items()
    }


def validation_loss(eval_fn, params, rows, batch_size, batch_sharding) -> dict[str, float]:
    """Token-weighted validation loss over every row once."""
    loss_sum = count = 0.0
    pid, pcount = jax.process_index(), jax.process_count()
    for local in data_lib.eval_batches(rows, batch_size, pid, pcount):
        out = eval_fn(params, global_batch(local, batch_sharding, batch_size))
        loss_sum += float(out["loss_sum"])
        count += float(out["loss_tokens"])
    loss = loss_sum / max(count, 1.0)
    return {
        "eval_loss": loss,
        "eval_perplexity": float(np.exp(min(loss, 50.0))),
        "eval_loss_tokens": count,
    }


@dataclasses.dataclass(frozen=True)
class StepFns:
    """The state's layout on the mesh and the jitted functions that use it."""

    mesh: jax.sharding.Mesh
    rules: tuple  # logical axis rules for activations, active while tracing
    abstract_state: steps.TrainState  # ShapeDtypeStructs
    state_shardings: steps.TrainState  # NamedShardings, same tree
    batch_sharding: jax.sharding.NamedSharding
    init: Callable  # rng -> TrainState, laid out by state_shardings
    init_from_params: Callable  # (params, rng) -> TrainState around given (pretrained) params
    train_step: Callable  # (state, batch) -> (state, metrics); state donated
    eval_step: Callable  # (params, batch) -> {loss_sum, loss_tokens}

    @contextlib.contextmanager
    def context(self):
        """Call (and so trace) the functions inside this: mesh and rules for constraints."""
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield


def build_steps(model: GPT, tx, schedule, mesh, micro_steps: int = 1) -> StepFns:
    """Shapes before arrays: eval_shape the init, derive every leaf's sharding from the
    logical axis rules, then jit init and steps with those shardings."""
    cfg = model.cfg
    init_fn = functools.partial(steps.init_state, model=model, tx=tx)
    boxed_abstract = jax.eval_shape(init_fn, jax.random.key(0))
    state_shardings = sharding.tree_shardings(boxed_abstract, mesh)
    batch_sharding = sharding.batch_sharding(mesh)
    sizes = {"act_heads": cfg.n_heads, "act_mlp": cfg.d_ff, "act_vocab": cfg.vocab_size}
    train_step = functools.partial(
        steps.train_step,
        model=model,
        tx=tx,
        schedule=schedule,
        micro_steps=micro_steps,
        dropout=cfg.dropout > 0,
    )
    return StepFns(
        mesh=mesh,
        rules=sharding.activation_rules(mesh, sizes),
        abstract_state=nn.meta.unbox(boxed_abstract),
        state_shardings=state_shardings,
        batch_sharding=batch_sharding,
        init=jax.jit(lambda rng: nn.meta.unbox(init_fn(rng)), out_shardings=state_shardings),
        init_from_params=jax.jit(
            functools.partial(steps.state_from_params, tx=tx),
            in_shardings=(state_shardings.params, None),
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """Train per `config`, writing metrics, events and checkpoints under `workdir`.

    Returns the last logged metrics (and the final evaluation)."""
    config = ml_collections.ConfigDict(config)  # a copy we may read freely
    is_main = jax.process_index() == 0
    model_cfg = config_lib.model_config(config)
    optim_cfg = config_lib.optim_config(config)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    config_lib.check(config, model_cfg, dict(mesh.shape))
    logging.info("mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.default_backend())

    # ---- data: rows → token ids + masks → packed rows, once; batches are step-indexed.
    tokenizer_name = config_lib.tokenizer_name(config)
    tokenizer = data_lib.load_tokenizer(tokenizer_name)
    if len(tokenizer) > model_cfg.vocab_size:
        raise ValueError(
            f"config: the tokenizer {tokenizer_name!r} has {len(tokenizer)} tokens but the "
            f"model ({config.model.init_from or config.model.preset}) only "
            f"{model_cfg.vocab_size}; set model.tokenizer to the model's own (or leave it '')"
        )
    data_spec = config_lib.data_spec(config)
    splits = data_lib.build_splits(data_spec, tokenizer)
    logging.info("data: %s", splits.stats)
    batch_size = config.train.batch_size
    num_steps = config_lib.total_steps(
        config, data_lib.num_batches_per_epoch(splits.train, batch_size)
    )
    eval_batch_size = config.train.eval_batch_size or batch_size

    # ---- model, optimizer, and the state's shapes and shardings before any array exists.
    model = GPT(model_cfg)
    tx, schedule = optim.make_optimizer(optim_cfg, num_steps)
    fns = build_steps(model, tx, schedule, mesh, config.train.micro_steps)
    batch_sharding = fns.batch_sharding

    checkpointer = ckpt_lib.Checkpointer(
        workdir, config.checkpoint.keep, config.checkpoint.async_save
    )
    if is_main:  # the tokenizer travels with the run: export and generation use this copy
        tokenizer.save_pretrained(os.path.join(workdir, "tokenizer"))
    meta = {
        "config": config_lib.to_json(config),
        "model": dataclasses.asdict(model_cfg),
        "tokenizer": tokenizer_name,
        "template": config.data.template,
    }

    with fns.context():
        target = ckpt_lib.abstract_with_shardings(fns.abstract_state, fns.state_shardings)
        resumed = checkpointer.restore_latest_good(
            target,
            validate=lambda saved: ckpt_lib.check_compatible(
                saved["model"], meta["model"], checkpointer.directory
            ),
        )
        if resumed is not None:
            state, _, resumed_step = resumed
            logging.info("resumed from %s at step %d", checkpointer.directory, resumed_step)
        elif config_lib.init_source(config):
            source = config_lib.init_source(config)
            param_shardings = fns.state_shardings.params
            _, params = hf.load_hf(
                source,
                allow_pickle=config.model.allow_pickle,
                param_dtype=model_cfg.param_dtype,
                scan_layers=model_cfg.scan_layers,
                # Each tensor goes to its devices as soon as it is converted.
                place=lambda path, leaf: jax.device_put(leaf, hf.get_path(param_shardings, path)),
                shapes=fns.abstract_state.params,
            )
            state = fns.init_from_params(params, jax.random.key(config.seed))
            logging.info("initialised from pretrained weights %s", source)
        else:
            state = fns.init(jax.random.key(config.seed))
        start_step = int(jax.device_get(state.step))
        train_step, eval_fn = fns.train_step, fns.eval_step

        peak, peak_source = metrics_lib.peak_flops_per_device(config.train.peak_flops)
        # FLOPs of one row of `width` positions (padding mode varies the width per batch).
        flops_per_row = lambda width: model_cfg.flops_per_token(width) * width
        logging.info("peak %.3g FLOP/s per device (%s); %d steps", peak, peak_source, num_steps)
        logger = metrics_lib.MetricsLogger(
            workdir, num_steps, start_step, enabled=is_main, progress_bar=config.train.progress_bar
        )

        def every(n: int, done: int) -> bool:
            return done == num_steps or (n > 0 and done % n == 0)

        window: list[dict] = []  # host copies of per-step metrics since the last record
        window_start = time.perf_counter()
        # Metrics are read one step late, so the host dispatches step i+1 before it waits for
        # step i; before anything is logged or saved, the step is read and checked first.
        pending: tuple[int, dict, int] | None = None  # step, device metrics, batch width
        record: dict[str, float] = {}
        compile_s: float | None = None
        untimed = 0  # leading steps of the window outside the timing (the compiling one)

        def check_pending() -> None:
            nonlocal pending
            if pending is None:
                return
            step, width, host = pending[0], pending[2], jax.device_get(pending[1])
            pending = None
            if not bool(host["finite"]):
                # The saves before this step hold good states: let an async one finish.
                checkpointer.wait()
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {step} (loss={float(host['loss'])}, "
                    f"grad_norm={float(host['grad_norm'])}): the update was not applied and "
                    "nothing was saved. Lower optim.learning_rate or check the data."
                )
            window.append(host | {"width": width})

        # Responses to held-out prompts before and after training (single process: the
        # prompts are host-local).
        gen_prompts = []
        judge = judge_lib.from_config(config.eval, os.environ)
        if config.eval.generations > 0 and jax.process_count() == 1:
            rows = evaluate_lib.held_out_rows(data_spec, config.eval.generations)
            gen_prompts = evaluate_lib.prompts_and_references(rows, data_spec, tokenizer)

        def write_generations(params, name: str) -> list[dict]:
            generator = Generator(model_cfg, params, end_token_ids(tokenizer))
            sampling = Sampling(max_new_tokens=config.eval.max_new_tokens, seed=config.seed)
            with nn.logical_axis_rules(()):  # generation batches are not laid out as training's
                responses = evaluate_lib.respond(
                    generator, tokenizer, [ids for ids, _, _ in gen_prompts], sampling
                )
            records = evaluate_lib.generation_records(
                [request for _, request, _ in gen_prompts],
                [reference for _, _, reference in gen_prompts],
                responses,
            )
            if judge is not None:
                judge.score_records(records)
            evaluate_lib.write_jsonl(os.path.join(workdir, f"generations_{name}.jsonl"), records)
            logging.info("generations %s training: %s", name, evaluate_lib.summarize(records))
            return records

        if start_step == 0 and gen_prompts:
            write_generations(state.params, "before")
        if start_step == 0 and splits.validation is not None:
            # The starting point, so the curve and the report show what training changed.
            before = validation_loss(eval_fn, state.params, splits.validation, eval_batch_size,
                              batch_sharding)  # fmt: skip
            logger.write(0, before)
        pid, pcount = jax.process_index(), jax.process_count()
        last_save_time = time.monotonic()
        with preemption.StopSignal() as stop:
            for step in range(start_step, num_steps):
                local = data_lib.batch_at(splits.train, step, batch_size, config.seed, pid, pcount)
                state, device_metrics = train_step(
                    state, global_batch(local, batch_sharding, batch_size)
                )
                check_pending()
                done = step + 1
                pending = (done, device_metrics, local["tokens"].shape[1])
                if step == start_step:  # the first call compiles: time it apart from training
                    check_pending()
                    compile_s = time.perf_counter() - window_start
                    logging.info("first step (compile included) took %.1f s", compile_s)
                    window_start, untimed = time.perf_counter(), 1
                logging_now = every(config.train.log_every, done)
                evaluating = splits.validation is not None and every(config.train.eval_every, done)
                preempted = stop.stop_requested(done)
                saving = (
                    every(config.checkpoint.save_every, done)
                    or preempted
                    or (
                        config.checkpoint.save_every_seconds > 0
                        and time.monotonic() - last_save_time
                        >= config.checkpoint.save_every_seconds
                    )
                )
                if not (logging_now or evaluating or saving):
                    continue
                check_pending()
                record = {}
                if logging_now:
                    elapsed = time.perf_counter() - window_start
                    record = _window_record(
                        window, untimed, elapsed, flops_per_row, batch_size, peak * mesh.size
                    )
                    if compile_s is not None:
                        record["compile_s"], compile_s, untimed = compile_s, None, 0
                if evaluating:
                    record.update(
                        validation_loss(
                            eval_fn,
                            state.params,
                            splits.validation,
                            eval_batch_size,
                            batch_sharding,
                        )
                    )
                if record:
                    logger.write(done, record)
                    logger.progress(done, record.get("loss"), record.get("tokens_per_sec"))
                if saving and checkpointer.latest_step() != done:
                    checkpointer.save(done, state, meta)
                    last_save_time = time.monotonic()
                if logging_now:
                    window, window_start = [], time.perf_counter()  # eval/save time is not training
                if preempted:
                    checkpointer.close()
                    logger.close()
                    logging.warning(
                        "stopped at step %d of %d on request; checkpoint saved in %s/%d. Run the "
                        "same command to resume.", done, num_steps, checkpointer.directory, done,
                    )  # fmt: skip
                    return record
        if gen_prompts:
            after = write_generations(state.params, "after")
            before_path = os.path.join(workdir, "generations_before.jsonl")
            if os.path.exists(before_path):
                with open(before_path, encoding="utf-8") as f:
                    before = [json.loads(line) for line in f]
                losses = _first_and_last_eval_loss(os.path.join(workdir, "metrics.jsonl"))
                report = evaluate_lib.report_markdown(before, after, *losses)
                with open(os.path.join(workdir, "report.md"), "w", encoding="utf-8") as f:
                    f.write(report)
                print(report.split("\n\n| prompt")[0])  # the figures; the rest is in the file
        if is_main and os.path.exists(os.path.join(workdir, "metrics.jsonl")):
            evaluate_lib.plot_loss_curve(
                os.path.join(workdir, "metrics.jsonl"), os.path.join(workdir, "loss_curve.png")
            )
        if config.export.hf_dir:
            out = os.path.join(workdir, os.path.expanduser(config.export.hf_dir))
            hf.save_hf(model_cfg, state.params, out, tokenizer=tokenizer)
            logging.info("exported the final params to %s (Hugging Face format)", out)
        checkpointer.close()  # waits for the last (async) save
        logger.close()
        if is_main:
            logging.info("done: step %d, checkpoints in %s", num_steps, checkpointer.directory)
    return record


def _first_and_last_eval_loss(metrics_path: str) -> tuple[float | None, float | None]:
    with open(metrics_path, encoding="utf-8") as f:
        losses = [r["eval_loss"] for r in map(json.loads, f) if "eval_loss" in r]
    return (losses[0], losses[-1]) if losses else (None, None)


def _window_record(
    window, untimed, elapsed, flops_per_row, batch_size, peak_total
) -> dict[str, float]:
    """Metrics of the steps since the last record: token-weighted loss over all of them,
    throughput and MFU over the `elapsed` seconds that the steps after `untimed` took."""
    loss_tokens = sum(float(m["loss_tokens"]) for m in window)
    loss_sum = sum(float(m["loss"]) * float(m["loss_tokens"]) for m in window)
    timed = window[untimed:] or window
    tokens = sum(float(m["tokens"]) for m in timed)
    steps_per_sec = len(timed) / max(elapsed, 1e-9)
    flops = sum(flops_per_row(m["width"]) * batch_size for m in timed)
    return {
        "loss": loss_sum / max(loss_tokens, 1.0),
        "learning_rate": float(window[-1]["learning_rate"]),
        "grad_norm": float(window[-1]["grad_norm"]),
        "tokens": sum(float(m["tokens"]) for m in window),
        "loss_tokens": loss_tokens,
        "tokens_per_sec": tokens / max(elapsed, 1e-9),
        "step_time_s": 1.0 / steps_per_sec,
        "mfu": flops / max(elapsed, 1e-9) / peak_total if peak_total else 0.0,
    }
