"""Every knob of sft_jax, with its default. Other configs start from this one.

    python -m sft_jax.main --config configs/default.py --workdir /tmp/run \
        --config.train.steps=100 --config.mesh.fsdp=-1
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0  # one seed for init, data order and dropout

    c.model = ml_collections.ConfigDict()
    # A GPTConfig preset (sft_jax.model.PRESETS): gpt2, gpt2-medium, gpt2-large, gpt2-xl,
    # smollm2-135m, llama3.1-8b, llama3.1-70b, qwen2.5-72b, qwen3-0.6b, qwen3-8b, mistral-7b,
    # gemma2-2b, gemma3-1b, gemma3-4b, qwen3-30b-a3b, mixtral-8x7b, gpt-oss-20b, gpt-oss-120b,
    # tiny, tiny-llama, tiny-moe.
    c.model.preset = "tiny"
    # "" = random init; "hf:<hub id | HF folder | GGUF file | asset:name>" starts from
    # pretrained weights, and the architecture comes from there (model.preset is unused).
    c.model.init_from = ""
    # GPTConfig fields (d_model, n_layers, vocab_size …) replacing the preset's: a recipe
    # states its model's shapes so sft-jax-plan works without the hub; with init_from set
    # they must equal the checkpoint's config.
    c.model.architecture = ml_collections.ConfigDict()
    c.model.allow_pickle = False  # allow pickled pytorch_model.bin weights (they can run code)
    c.model.tokenizer = ""  # tokenizer name or folder; "" = from init_from, else the preset's
    c.model.dtype = "float32"  # compute dtype: float32 on CPU, bfloat16 on TPU/GPU
    c.model.param_dtype = "float32"  # storage dtype of parameters and optimizer moments
    c.model.remat = "none"  # "none" | "full" | "dots": recompute in the backward pass for memory
    # Attention kernel: "auto" = TPU splash attention (segment ids), GPU cuDNN flash attention,
    # XLA elsewhere; or force "xla" | "splash" | "cudnn" (see sft_jax/kernels.py).
    c.model.attention = "auto"
    c.model.scan_layers = True  # scan one block over layers: compile time independent of depth
    c.model.dropout = 0.0  # residual/embedding dropout during training

    c.data = ml_collections.ConfigDict()
    # Sources: a .json/.jsonl/.csv/.parquet path, glob or folder, a save_to_disk folder
    # (path[@split]), "hf:<name>[:<config>][@<split>]", or generated tasks "synthetic:<task>:<n>".
    # A mixture: sources with weights, "a.jsonl:0.7,hf:org/b:0.3" (each example drawn from a
    # source by weight), or c.data.mixture below.
    c.data.train = "synthetic:mix:2000"
    # Mixture sources with options of their own (then set data.train = ""): each a source
    # string or dict(source=..., weight=1.0, name=..., format=..., fields=...).
    c.data.mixture = ()
    c.data.mixture_examples = 0  # examples per epoch of a mixture; 0 = as many as the sources hold
    c.data.validation = "0.05"  # a source like data.train, a held-out fraction of its rows, or ""
    # Row shape: alpaca (instruction, input, output), prompt_completion, messages (role/content,
    # multi-turn), sharegpt (conversations: from/value), or auto (from the first row's fields).
    c.data.format = "auto"
    # Rename fields: "instruction=question,output=answer"; add role names: "role.assistant=bot".
    c.data.fields = ""
    # alpaca | human_assistant | chatml | raw (prompt + completion + EOS) | tokenizer (the
    # tokenizer's own chat template) | format (the strings below) | path/to/template.jinja
    c.data.template = "alpaca"
    # data.template=format: one format string per role; fields {content}, {input} (Alpaca's),
    # {eos}, {bos}. From {content} to the end of `assistant` is trained (trailing space not).
    c.data.template_format = ml_collections.ConfigDict()
    c.data.template_format.system = "{content}\n\n"
    c.data.template_format.user = "{content}\n\n"
    c.data.template_format.user_with_input = ""  # "" = the user string with content + input
    c.data.template_format.assistant = "{content}{eos}"
    c.data.template_format.separator = ""  # after an assistant turn that more turns follow
    c.data.template_format.default_system = ""  # when a conversation has no system message
    c.data.template_format.default_system_with_input = ""  # …and its user turn has an input
    c.data.train_on = "response"  # "response": loss on responses + their EOS only; "all": all
    c.data.assistant_turns = "all"  # conversations: train every assistant turn, or only the "last"
    # One example per assistant turn, each its prompt as at inference then that turn (trained):
    # "auto" where the chat template renders earlier turns differently once more follow (Qwen3),
    # "always", or "never" (such a conversation is then an error, or skipped with on_bad_row).
    c.data.split_turns = "auto"
    # Train the <think> blocks of assistant turns (reasoning_content, or <think> in the content);
    # False masks them (the answer and end token still train). Counted as reasoning_tokens.
    c.data.train_reasoning = True
    # Tools (function definitions) for rows without a `tools` field: a JSON list, or a .json
    # file holding one; passed to the chat template's tools= (chatml: Hermes/Qwen style).
    c.data.tools = ""
    c.data.max_seq_len = 128  # tokens per row
    # Over max_seq_len: "truncate" cuts the response (its EOS is lost, counted), "drop", "error".
    c.data.too_long = "truncate"
    # A prompt that fills max_seq_len alone: "drop" (counted) or "truncate_left" (cut its start).
    c.data.long_prompt = "drop"
    # Pack several examples per row (best-fit decreasing, segment ids); False = one example
    # per row, each batch padded to its longest row (rounded up to data.pad_multiple).
    c.data.packing = True
    c.data.max_segments = 64  # examples per packed row at most (0 = no cap)
    c.data.pad_multiple = 64  # packing=False: pad widths to a multiple of this (fewer compiles)
    c.data.on_bad_row = "error"  # "error": stop at the first bad row, naming it; "skip": count it
    c.data.max_drop_fraction = 0.1  # error if a split drops more of its rows than this
    c.data.streaming = False  # stream hub data sets instead of reading their Arrow copy
    # Tokenized, packed data is cached on disk, keyed by data, config, tokenizer and code.
    c.data.cache = True
    # "" = $SFT_JAX_CACHE/data, else ~/.cache/sft_jax/data; with several processes,
    # WORKDIR/data_cache: they tokenize a share each there, so every host must read it.
    c.data.cache_dir = ""
    c.data.num_workers = -1  # tokenizing processes: -1 = one per core for >16k rows; 0 = none

    c.train = ml_collections.ConfigDict()
    c.train.steps = 0  # optimizer steps; 0 = derive from train.epochs
    c.train.epochs = 1.0  # passes over the packed training rows (steps win when both are set)
    c.train.batch_size = 8  # global batch in rows, over all devices and hosts
    c.train.micro_steps = 1  # gradient accumulation: micro-batches per step (batch_size divisible)
    c.train.log_every = 10  # steps between metric records
    c.train.eval_every = 100  # steps between validation passes (0 = only at the end)
    c.train.eval_batch_size = 0  # 0 = train.batch_size
    c.train.eval_steps = 0  # validation batches per evaluation (0 = the whole split)
    c.train.peak_flops = 0.0  # per-device peak FLOP/s for MFU; 0 = data sheet, or measured on CPU
    c.train.progress_bar = True
    # A jax.profiler trace of steps [profile_start, profile_start + profile_steps) written to
    # WORKDIR/profile (TensorBoard's profile plugin or Perfetto read it); 0 steps = off.
    c.train.profile_start = 3
    c.train.profile_steps = 0
    # JAX's persistent compilation cache: a second run of the same step skips XLA's compile.
    c.train.compilation_cache_dir = ""  # "" = off
    # Label smoothing ε of the training loss (torch's CrossEntropyLoss(label_smoothing=ε)):
    # targets (1 − ε)·onehot + ε/vocab. Evaluation losses stay the plain nll. 0 = off.
    c.train.label_smoothing = 0.0
    # NEFTune (Jain et al. 2023; transformers' neftune_noise_alpha): uniform noise
    # U(-1, 1)·alpha/sqrt(L·d_model) on the token embeddings while training (not at evaluation
    # or generation), L each example's own length, also in a packed row. 5 is the paper's
    # usual value. 0 = off.
    c.train.neftune_alpha = 0.0
    # Early stopping: stop (checkpoint saved, report written) after this many evaluations
    # without the checkpoint.keep_best metric (else eval_loss) improving by at least
    # early_stopping_min_delta. 0 = off.
    c.train.early_stopping_patience = 0
    c.train.early_stopping_min_delta = 0.0
    # Where the metrics go beside metrics.jsonl: any of "tensorboard", "wandb", "mlflow" (a
    # tuple, or "tensorboard,wandb" on the command line). Each gets the same scalars, the
    # config as run parameters and, at the end, report.md and loss_curve.png. wandb and
    # mlflow are extras: pip install 'sft_jax[wandb]' / 'sft_jax[mlflow]'. W&B reads its
    # usual variables (WANDB_MODE=offline, WANDB_ENTITY, …); a resumed run goes on in the
    # same tracker run (ids in WORKDIR/trackers.json).
    c.train.trackers = ("tensorboard",)
    c.train.tracker_project = "sft_jax"  # the W&B project and the MLflow experiment
    c.train.mlflow_tracking_uri = ""  # "" = $MLFLOW_TRACKING_URI, else a file store WORKDIR/mlruns

    c.optim = ml_collections.ConfigDict()
    # adamw | adafactor (transformers' fine-tuning settings: absolute lr, e.g. 1e-3) | lion
    # (lr 3–10× lower than AdamW's, b2 0.99 in its paper) | sgd (momentum) | muon (the
    # blocks' kernels, one matrix per layer's matmul; AdamW for embeddings, head, norms)
    c.optim.name = "adamw"
    c.optim.learning_rate = 3e-4  # peak learning rate
    c.optim.warmup_steps = 0  # linear warmup from 0
    c.optim.decay = "cosine"  # after warmup: cosine | linear | constant
    c.optim.end_learning_rate_ratio = 0.1  # final lr as a fraction of the peak
    c.optim.weight_decay = 0.0  # decoupled decay (lr·wd·p), on dense kernels and LoRA only
    c.optim.decay_embeddings = False  # also decay the embedding tables
    c.optim.b1 = 0.9  # adamw's and lion's betas
    c.optim.b2 = 0.999
    c.optim.eps = 1e-8
    c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 = off
    c.optim.momentum = 0.9  # sgd's momentum (0 = none)
    c.optim.nesterov = False  # sgd: Nesterov momentum
    c.optim.muon_momentum = 0.95  # muon's Nesterov momentum (its AdamW part uses b1, b2)

    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.save_every = 500  # steps between checkpoints (the last step is always saved)
    c.checkpoint.save_every_seconds = 0.0  # also save when this much time passed (0 = off)
    c.checkpoint.keep = 3  # newest checkpoints kept
    c.checkpoint.async_save = True  # write in the background while training goes on
    # Also keep the best checkpoint by this evaluation metric, lower is better ("eval_loss",
    # "eval_loss/<source>"; "max:<metric>" when higher is better); named in its metadata
    # ("best") and exported by sft-jax-export --best. An evaluation that improves it saves.
    # "" = off.
    c.checkpoint.keep_best = ""

    c.eval = ml_collections.ConfigDict()
    # Held-out prompts answered before and after training (generations_{before,after}.jsonl,
    # scored by exact match where answers are checkable, and report.md side by side).
    c.eval.generations = 0
    c.eval.max_new_tokens = 64  # greedy decoding, stops at EOS / end of turn
    # Optional LLM-as-judge score (0-100) of those responses, from an OpenAI-compatible chat
    # endpoint: e.g. judge_url="http://localhost:11434/v1" (Ollama), judge_model="llama3.1:8b".
    c.eval.judge_url = ""  # "" = off
    c.eval.judge_model = ""
    c.eval.judge_api_key_env = "OPENAI_API_KEY"  # environment variable holding the key, if any
    # Benchmarks with lm-evaluation-harness's own task definitions (pip install -e ".[eval]"),
    # scored before and after training, side by side in report.md: e.g. "gsm8k,ifeval", or a
    # local YAML task under harness_include_path (tests/data/harness: synthetic_qa).
    c.eval.harness_tasks = ""  # comma-separated; "" = off
    c.eval.harness_include_path = ""
    c.eval.harness_limit = 0  # documents per task (0 = all)
    c.eval.harness_num_fewshot = -1  # -1 = each task's own
    c.eval.harness_chat_template = True  # prompts in the run's data.template, as trained
    c.eval.harness_batch_size = 8

    c.lora = ml_collections.ConfigDict()
    # LoRA (PEFT's): train rank-r adapters on a frozen base instead of every weight; 0 = off.
    c.lora.rank = 0
    c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
    c.lora.dropout = 0.0  # dropout on the adapters' input, in training
    # Dense layers to adapt, PEFT's names: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,
    # down_proj (Llama family); c_attn,c_proj,c_fc, attn.c_proj, mlp.c_proj (GPT-2); or
    # "all-linear" (every dense layer of every block, not the head).
    c.lora.targets = "all-linear"
    c.lora.use_rslora = False  # scale by alpha / sqrt(rank) (rank-stabilised LoRA)
    c.lora.init = "kaiming"  # A: "kaiming" uniform (PEFT's default) or "gaussian"; B = 0
    # QLoRA: store the frozen base's block kernels quantized, dequantized inside each matmul:
    # "nf4" (4-bit NormalFloat, blocks of 64; 4.13 bits/weight with double_quant), "int8"
    # (per output channel), or "" (the base in base_dtype).
    c.lora.quantize = ""
    c.lora.double_quant = True  # nf4: quantize the block scales too (QLoRA's)
    c.lora.base_dtype = ""  # the frozen base's dtype: "" = model.param_dtype, or "bfloat16"
    # Start from a PEFT adapter folder's adapters (continue training it) on model.init_from,
    # its base; lora.rank, alpha, targets and use_rslora must be the folder's.
    c.lora.init_from = ""

    c.export = ml_collections.ConfigDict()
    # At the end of the run, write a Hugging Face folder here ("" = no; relative = in workdir).
    # Any checkpoint can also be exported later: sft-jax-export --workdir DIR --out X
    c.export.hf_dir = ""
    # Tensor dtype of the export: float32, bfloat16 or float16. "" = bfloat16 when
    # model.dtype is bfloat16 (the precision the model ran at, half the bytes of float32
    # master weights), else model.param_dtype (a float32 run exports bit-exact weights).
    c.export.dtype = ""
    # LoRA runs: also write the adapters as a PEFT folder here (adapter_config.json +
    # adapter_model.safetensors, for peft.PeftModel.from_pretrained and vLLM --lora-modules).
    # export.hf_dir then gets the merged model (W + scale·B·A). Later: sft-jax-export --adapter
    c.export.adapter_dir = ""

    c.mesh = ml_collections.ConfigDict()
    c.mesh.data = 1  # replicated data parallelism
    c.mesh.fsdp = -1  # sharded data parallelism (params + optimizer state); -1 = the rest
    c.mesh.tensor = 1  # tensor parallelism over heads, MLP width and vocabulary
    c.mesh.expert = 1  # expert parallelism: a mixture of experts' experts split over devices
    return c
