"""The configuration's schema: every dotted key with its type, default, range and meaning (``SCHEMA``).

What ``core/config.py`` validates against, what the dashboard's settings form lists (in this order) and what
docs/configuration.md shows (``core/config_docs.py`` renders the page's table from it). Every number has both
bounds, each with its reason next to it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

PRECISIONS = ("32-true", "bf16-true", "bf16-mixed", "16-mixed")
OPTIMIZERS = ("adamw", "sgd", "adam_8bit", "paged_adamw_8bit", "deepspeed_cpu")
STRATEGIES = ("auto", "deepspeed_stage_2_offload", "ddp")
QUANTIZATIONS = ("none", "8bit", "4bit-nf4", "4bit-fp4")
WEIGHTS = ("pretrained", "random", "auto")
JOB_KINDS = ("train", "load", "generate")
DEVICE_MAP_NAMES = ("cuda", "cpu", "auto", "cpu-first")
DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class Field:
    """One allowed key: its type(s), default and constraint, used for messages as well as checks.

    Every number has both bounds: an absurd value (``batch_size = 10**12``, ``sample_hz = 1e-300``) is refused
    here in a second, instead of costing minutes and gigabytes before failing somewhere deep in the run. ``why``
    says where a bound comes from; the refusal shows it and docs/configuration.md repeats it.
    """

    types: tuple[type, ...]
    default: Any
    choices: tuple[Any, ...] | None = None
    minimum: float | None = None
    exclusive_minimum: bool = False
    maximum: float | None = None
    exclusive_maximum: bool = False
    help: str = ""
    why: str = ""
    allowed_text: str | None = None  # what is allowed, when the bounds alone do not say it (max_steps' -1)
    excluded: tuple[float, ...] = ()  # values inside the bounds that mean nothing (max_steps = 0)
    # docs/configuration.md's row (``core/config_docs.py`` renders it): what the key means, and where the type,
    # default or allowed values need more words than the checks above give them.
    doc: str = ""
    doc_type: str | None = None
    doc_default: str | None = None
    doc_allowed: str | None = None

    def allowed(self) -> str:
        if self.allowed_text is not None:
            return self.allowed_text
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        names = "a number" if float in self.types else " or ".join(type_name(t) for t in self.types)
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.exclusive_minimum else '>='} {fmt_num(self.minimum)}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.exclusive_maximum else '<='} {fmt_num(self.maximum)}")
        return f"{names} {' and '.join(parts)}" if parts else names

    def out_of_range(self, value: float) -> bool:
        """True when ``value`` (a finite number) lies outside the bounds."""
        if value in self.excluded:
            return True
        if self.minimum is not None and (value <= self.minimum if self.exclusive_minimum else value < self.minimum):
            return True
        return self.maximum is not None and (value >= self.maximum if self.exclusive_maximum else value > self.maximum)


def type_name(t: type) -> str:
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a table"}.get(
        t, t.__name__
    )


def fmt_num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e16 else str(x)


# Upper bounds. Each is far above any real use and far below what breaks something; the reason is in ``why``.
MAX_BATCH = 65_536  # per device: 65,536 224x224 fp32 images are 37 GiB of input alone, before any activation
MAX_ACCUMULATE = 65_536  # micro-batches per optimizer step; more only folds whole epochs into one step
MAX_EPOCHS = 100_000
MAX_STEPS = 10_000_000  # optimizer steps: weeks of training at 10 steps/s
MAX_SAMPLES = 100_000_000  # under DDP every rank's DistributedSampler lists all indices: ~4 GB of host RAM at 1e8
MAX_WORKERS = 256  # DataLoader worker processes: the core count of the largest two-socket servers
MAX_LR = 10.0  # no optimizer here trains with a larger step; SGD recipes stay below 1
MIN_LR = 1e-10  # Adam moves a weight by about lr per step: below ~1e-10 an fp32 weight of 0.01 cannot change
MAX_LORA_R = 4096  # a rank above the adapted layer's width adds nothing; the widest hidden size shipped is 4096
MAX_LORA_ALPHA = 65_536.0  # alpha / r scales the adapter's output; 65,536 / 16 = 4096x is already absurd
MAX_TOKENS = 8192  # text positions per sample; OPT's positions stop at 2048, the lab's captions take 50
MAX_DEVICES = 64  # ranks per machine: the biggest GPU servers hold 16; CPU (gloo) ranks are processes
MAX_NODES = 1024  # machines; 64 x 1024 = 65,536 ranks
MAX_SEED = 2**32 - 1  # the range every seeding API accepts (numpy, Lightning's seed_everything)
GPU_INDEX_MAX = MAX_DEVICES - 1  # the largest GPU index a device_map may name
# The timeline's rate. At most 100 Hz: peaks come from the allocator per phase, not from the timeline, so a faster
# timeline finds nothing new, while each sample takes the training process's Python time (12 us measured on a CPU,
# more with NVML's queries on a GPU; at 1e9 Hz the job ran at half speed) and a line of events.jsonl (the 1,000,000
# samples the dashboard opens in a second are 2.8 hours at 100 Hz). At least 0.1 Hz: a sample every 10 s is six
# points a minute already, and a slower rate left `watch` sleeping for days after its command had ended.
MIN_SAMPLE_HZ = 0.1
MAX_SAMPLE_HZ = 100.0

# The schema: dotted key -> Field. Order here is the order shown in the dashboard and docs.
SCHEMA: dict[str, Field] = {
    "name": Field(
        (str,),
        "unnamed",
        doc="the run's name; runs go to `profiles/<UTC time>-<name>/`",
        doc_default='`"unnamed"` (a file: its stem)',
        doc_allowed="letters, digits, space and `- _ . /`, 1–120 characters, no `..`, not starting with `/`",
    ),
    "description": Field((str,), "", doc="one line shown by `presets` and the dashboard"),
    "model.id": Field(
        (str,),
        "tiny/blip2-opt",
        help="hub id, local path, or tiny/<name>",
        doc="hub id (`Salesforce/blip2-opt-2.7b`), local path, or a built-in tiny model (`tiny/blip2-opt`, `tiny/blip2-t5`, `tiny/blip-vqa`)",
    ),
    "model.weights": Field(
        (str,),
        "auto",
        WEIGHTS,
        doc="`random` builds the real-size architecture from its config without downloading weights; `auto` uses pretrained weights when present locally, else random",
    ),
    "model.dtype": Field(
        (str,), "float32", DTYPES, doc="dtype of load and generate jobs (train jobs follow `train.precision`)"
    ),
    "model.quantization": Field((str,), "none", QUANTIZATIONS, doc="bitsandbytes quantization of the base model"),
    "model.device_map": Field(
        (str, dict),
        "auto",
        help="cuda | cpu | auto | cpu-first | {module = device}",
        doc='where the model goes: `cuda` the whole model on the GPU; `cpu` on the CPU; `auto` the process\'s own GPU for training, accelerate\'s "every GPU, then the CPU" for load and generate jobs, the CPU without a GPU; `cpu-first` loaded on the CPU, then moved to the GPU; a table places each module (`""` = the whole model)',
        doc_allowed='`cuda`, `cpu`, `auto`, `cpu-first`, or a table `{module = device}` whose devices are a GPU index in [0, 63], `"cuda:N"` (N in [0, 63]) or `"cpu"`; **not `"disk"`** (below)',
    ),
    "model.trust_remote_code": Field((bool,), False, doc="passed to `from_pretrained` for models with their own code"),
    "job.kind": Field(
        (str,),
        "train",
        JOB_KINDS,
        doc="`train`: training steps with the four phases; `load`: load the model and measure its placement; `generate`: three `generate()` calls of `train.batch_size` images",
    ),
    "train.batch_size": Field(
        (int,),
        8,
        minimum=1,
        maximum=MAX_BATCH,
        why="per device; 65536 images of 224x224 are 37 GiB of input alone",
        doc="samples per micro-batch, per device (per rank). 65,536 images of 224×224 in fp32 are 37 GiB of input before any activation. Also the batch of `generate` jobs",
        doc_allowed="[1, 65536], and at most each rank's share of the data set (below)",
    ),
    "train.accumulate_grad_batches": Field(
        (int,),
        1,
        minimum=1,
        maximum=MAX_ACCUMULATE,
        doc="micro-batches per optimizer step; more than an epoch's batches only folds the epoch into one step",
    ),
    "train.precision": Field(
        (str,), "32-true", PRECISIONS, doc="Lightning's precision strings, as the seed lab names them"
    ),
    "train.optim": Field(
        (str,),
        "adamw",
        OPTIMIZERS,
        doc='the optimizer (`deepspeed_cpu` needs `train.strategy = "deepspeed_stage_2_offload"`)',
    ),
    "train.lr": Field(
        (float, int),
        5e-6,
        minimum=MIN_LR,
        maximum=MAX_LR,
        why="no optimizer here trains with a larger step",
        doc="learning rate. Below 1e-10 Adam's step (about `lr` per weight) cannot change an fp32 weight of 0.01; no optimizer here trains with a step above 10",
    ),
    "train.act_ckpt": Field((bool,), False, doc="activation (gradient) checkpointing"),
    "train.max_epochs": Field((int,), 2, minimum=1, maximum=MAX_EPOCHS, doc="epochs over `train.num_train_samples`"),
    "train.max_steps": Field(
        (int,),
        -1,
        minimum=-1,
        maximum=MAX_STEPS,
        excluded=(0,),
        allowed_text=f"-1 (no limit) or a positive number of optimizer steps (an integer >= -1 and <= {MAX_STEPS}, not 0)",
        doc="optimizer steps at most; 0 is refused (it would run nothing)",
        doc_allowed="-1 (no limit) or [1, 10000000]",
    ),
    "train.num_train_samples": Field(
        (int,),
        512,
        minimum=1,
        maximum=MAX_SAMPLES,
        why="under DDP each rank lists every index of the data set in host RAM",
        doc="samples per epoch (a folder with fewer: the folder). Under DDP each rank's `DistributedSampler` lists every index in host RAM (~4 GB at 10^8)",
    ),
    "train.num_workers": Field(
        (int,),
        0,
        minimum=0,
        maximum=MAX_WORKERS,
        why="each worker is a process",
        doc="DataLoader worker processes; 256 is the core count of the largest two-socket servers",
    ),
    "train.strategy": Field(
        (str,),
        "auto",
        STRATEGIES,
        doc="`ddp` for several ranks; DeepSpeed ZeRO-2 with the optimizer offloaded to the host",
    ),
    "train.devices": Field(
        (int,),
        1,
        minimum=1,
        maximum=MAX_DEVICES,
        help="ranks (GPUs or CPU processes) per machine",
        doc='ranks (GPUs, or CPU processes) per machine; more than 1 needs `train.strategy = "ddp"`',
    ),
    "train.num_nodes": Field(
        (int,),
        1,
        minimum=1,
        maximum=MAX_NODES,
        help="machines; each runs `blipmon run` with NODE_RANK set",
        doc="machines; each runs `blipmon run` with `NODE_RANK` set; more than 1 needs `ddp`",
    ),
    "train.lora.enabled": Field((bool,), False, doc="train LoRA adapters instead of the whole model"),
    "train.lora.r": Field(
        (int,),
        16,
        minimum=1,
        maximum=MAX_LORA_R,
        why="a rank above the adapted layer's width adds nothing",
        doc="LoRA rank; a rank above the adapted layer's width adds nothing, and the widest hidden size shipped is 4096",
    ),
    "train.lora.alpha": Field(
        (int, float),
        32,
        minimum=0,
        exclusive_minimum=True,
        maximum=MAX_LORA_ALPHA,
        doc="LoRA alpha (the adapter's output is scaled by alpha / r)",
    ),
    "train.lora.dropout": Field(
        (float, int),
        0.05,
        minimum=0,
        maximum=1,
        exclusive_maximum=True,
        allowed_text="a number in [0, 1)",
        doc="LoRA dropout probability",
    ),
    "train.lora.target_modules": Field(
        (list,),
        [],
        help="module names; empty = per-architecture default",
        doc="modules that get adapters; empty = the architecture's default (query/value projections)",
        doc_allowed="non-empty module names",
    ),
    "train.qlora": Field(
        (bool,),
        False,
        doc='QLoRA: the base model in 4-bit NF4 with LoRA adapters (not with `model.quantization = "8bit"`)',
    ),
    "data.source": Field(
        (str,),
        "synthetic",
        doc="`synthetic`: deterministic random images and captions shaped like the model's inputs; a folder: images with captions in `metadata.jsonl` (Hugging Face's imagefolder convention)",
        doc_allowed="`synthetic` or a folder",
    ),
    "data.max_length": Field(
        (int,),
        50,
        minimum=1,
        maximum=MAX_TOKENS,
        why="text positions per sample",
        doc="text positions per sample (captions are padded or truncated to it); OPT's positions stop at 2048",
    ),
    "data.caption_tokens": Field(
        (int,),
        0,
        minimum=0,
        maximum=MAX_TOKENS,
        help="synthetic caption length; 0 = every caption fills max_length (the worst case)",
        doc="length of the synthetic captions, at most `data.max_length`; 0 = every caption fills `data.max_length` (the worst case). Models a batch padded to its longest caption",
    ),
    "data.image_placeholders": Field(
        (bool,),
        True,
        help="BLIP-2: image tokens before each caption, as the processor puts them; false = the caption alone, "
        "as the seed lab tokenizes it (the language model then sees only the caption)",
        doc="BLIP-2: the image placeholder tokens before each caption, as the processor puts them; `false` = the caption alone, as the seed lab tokenizes it (its language model then sees only the caption; lab presets set it)",
    ),
    "runtime.alloc_conf": Field(
        (str,), "", doc='`PYTORCH_CUDA_ALLOC_CONF` for the child, e.g. `"max_split_size_mb:128"`'
    ),
    "runtime.sample_hz": Field(
        (float, int),
        10.0,
        minimum=MIN_SAMPLE_HZ,
        maximum=MAX_SAMPLE_HZ,
        why="peaks come from the allocator, not the timeline; faster sampling only slows the job",
        doc="samples per second of the memory timeline (below)",
    ),
    "runtime.probes": Field(
        (bool,),
        True,
        help="per-phase attribution; off only to measure its cost",
        doc="per-phase attribution (params, grads, optimizer, activations); off only to measure its cost",
    ),
    "runtime.module_depth": Field(
        (int,),
        2,
        minimum=0,
        maximum=8,
        why="each level multiplies the modules recorded at every boundary; deeper than 8 is single layers' parts",
        help="per-module memory down to this depth below the model (0 = off)",
        doc="per-module memory (params, grads, optimizer state, activations) for the model's modules down to this "
        "depth below the root: 2 = the top-level children (`vision_model`, `qformer`, `language_model`) and their "
        "children, a module with a single child module being no level of its own (`language_model.model.decoder`); "
        "`0` turns it off",
    ),
    "runtime.module_every": Field(
        (int,),
        10,
        minimum=1,
        maximum=1_000_000,
        why="1 = every step; the per-module records of a long run then outweigh the rest of its profile",
        help="count in full (grads, optimizer state, activations, per module) at steps 0 and 1 and every N-th step",
        doc="the steps counted in full: steps 0 and 1 and every N-th step after (step % N == 0) record grads, "
        "optimizer state and activations at every boundary, split by module when `module_depth` > 0; the other "
        "steps record the allocator's figures, host RSS and params at every boundary, with grads, optim, acts and "
        'other null. 1 = every step, at a cost (docs/modules.md, "What it costs")',
    ),
    "runtime.predict": Field(
        (bool,),
        True,
        help="save the memory estimate when the run starts",
        doc="save the memory estimate in the run when it starts, so `show` puts predicted beside measured",
    ),
    "runtime.seed": Field(
        (int,),
        0,
        minimum=0,
        maximum=MAX_SEED,
        doc="seed of the synthetic data and the model's random weights; the range every seeding API accepts",
    ),
}
