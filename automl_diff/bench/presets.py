"""Benchmark presets: one teacher, one sampler and FID setup, and the budget of every method and peer.

``digits`` runs on 2 CPU cores in about an hour (the shipped digits teacher, 100 DDIM steps,
FID on 5 sets of 500 samples). ``digits-t2i`` is the text-to-image benchmark on the shipped
``digits-t2i`` pipeline (50 guided DDIM steps, FID and prompt accuracy on 5 sets of 500 images of
the evaluation prompts), every method, BK-SDM and DeepCache, in about 75 minutes on 2 CPU cores.
``shapes-t2i`` is the same on the shipped ``shapes-t2i`` pipeline, which has Stable Diffusion's
block layout: 25 guided DDIM steps, FID (the shapes classifier's features) and prompt accuracy
(every attribute of the scene right) on 5 sets of the 480 evaluation scenes, and both BK-SDM
students, in at most 120 minutes on 2 CPU cores.
``ddpm-cifar10`` is the same benchmark at CIFAR-10 scale for a GPU: the
``google/ddpm-cifar10-32`` teacher (a hub id, or its downloaded folder with ``--teacher``) and
Inception FID against a folder of CIFAR-10 training images (``--fid-dataset folder:PATH``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from automl_diff.config.evaluation import Evaluation, SamplingSettings

__all__ = ["PRESETS", "BenchPreset", "Goal", "bench_evaluation"]

_ROOT = Path(__file__).resolve().parents[2]


def bench_evaluation(*, steps: int = 100, guidance_scale: float = 7.5, **evaluation: Any) -> Evaluation:
    """A preset's evaluation: DDIM with ``steps`` steps and ``guidance_scale``, and the
    benchmark's defaults (FID on 1000 samples per set, timed at batch 64 over 5 rounds)."""
    defaults = {"fid_samples": 1000, "fid_batch_size": 250, "latency_batch_size": 64, "latency_repeats": 5}
    sampling = SamplingSettings(steps=steps, guidance_scale=guidance_scale)
    return Evaluation(sampling=sampling, **{**defaults, **evaluation})


#: The rows a preset measures unless it names its own (the text-to-image preset adds BK-SDM and
#: the data-based DKDM baseline).
DEFAULT_ROWS = ("teacher", "dkdm", "diffnas", "torch_pruning", "dipgo", "deepcache", "steps", "stacked")


@dataclass(frozen=True)
class Goal:
    """A goal one row is judged on, each part at its unfavourable end.

    Attributes:
        row: the rows judged: every row whose name starts with this, or with one of these (the best
            of them is named).
        against: the row it is compared with, set by set (paired): ``teacher`` or another row's name.
        macs: at least this many times fewer trajectory MACs than the teacher (exact, counted).
        params: at least this many times fewer parameters than the teacher.
        fid_ratio: FID / ``against``'s at most this: the high end of the paired ratio's 95% interval.
        fid_lower: FID below ``against``'s: the high end of the paired difference's interval below 0.
        alignment_drop: text alignment at most this below ``against``'s: the low end of the paired
            difference's interval.
        matched_macs: ``against`` has at least the row's trajectory MACs (compared at equal or
            fewer MACs).
        efficiency: measured speedup over the teacher at least this fraction of the MACs reduction
            at the preset's batch: the lower quartile of the rounds.
    """

    row: str | tuple[str, ...]
    against: str = "teacher"
    macs: float = 1.0
    params: float = 1.0
    fid_ratio: float | None = None
    fid_lower: bool = False
    alignment_drop: float | None = None
    matched_macs: bool = False
    efficiency: float | None = None

    @property
    def rows_named(self) -> str:
        """The rows judged, in words."""
        return self.row if isinstance(self.row, str) else " or ".join(self.row)

    def describe(self) -> str:
        parts = []
        if self.macs > 1:
            parts.append(f"at least {self.macs:g}x fewer trajectory MACs")
        if self.params > 1:
            parts.append(f"at least {self.params:g}x fewer parameters")
        if self.fid_ratio is not None:
            parts.append(f"FID at most {self.fid_ratio:g}x {self.against}'s")
        if self.fid_lower:
            parts.append(f"FID below {self.against}'s")
        if self.alignment_drop is not None:
            parts.append(f"text alignment at most {100 * self.alignment_drop:g} points below {self.against}'s")
        if self.matched_macs:
            parts.append(f"at no more trajectory MACs than {self.against}")
        if self.efficiency is not None:
            parts.append(f"speedup at least {self.efficiency:g} of the MACs reduction")
        return f"{self.rows_named}: " + ", ".join(parts)


@dataclass(frozen=True)
class BenchPreset:
    """Everything one benchmark run uses. All rows share the teacher, sampler, steps and FID noise.

    Attributes:
        name: the preset's name (section of ``BENCHMARKS.md``).
        teacher: a built-in teacher, a diffusers folder or a hub id.
        evaluation: how every row is measured, as a study's (:class:`~automl_diff.config.Evaluation`):
            the sampler (DDIM steps of FID, latency, MACs per trajectory and DiP-GO's schedules;
            guidance), FID's reference, features and ``fid_samples`` per sample set, the batch
            size the preset samples with (``latency_batch_size``: where its speed goal is
            judged), the timed lockstep rounds (``latency_repeats``), images per prompt and the
            text-alignment metric.
        fid_sets: independent sample sets per row, one per evaluation seed (``eval_seed``,
            ``eval_seed + 1``, ...): a row's FID is their mean with a t-interval, and rows are
            compared set by set.
        latency_batches: further batch sizes every row is timed at (people sample with small ones).
        latency_warmup: untimed rounds before the timed ones.
        compiled: also time the teacher and DiP-GO's schedules compiled (``torch.compile`` of the
            teacher's UNet; ``apply_schedule(..., compile=True)``) in the same lockstep rounds,
            their warm-ups apart, and judge the goal ``(speedup / MACs reduction at the preset's
            batch, the same at batch 1, warm-up against the compiled teacher's)`` of each
            schedule compiled against the teacher compiled; None: eager only.
        compiled_plan_graphs: the schedules compiled with ``plan_graphs`` (``apply_schedule``):
            a trajectory's first call and the plans that the most later calls share get graphs
            of their own.
        batch_size, lr, ema_decay: training batches of DKDM, DiffNAS retraining and the
            Torch-Pruning fine-tune (one data-free pool of the teacher's generations feeds all).
        pool_size, pool_steps: that pool.
        pool: further options of that pool (``guided_pool``, ``pool_guidance``: DKDM's options).
        dkdm_space, dkdm_params: the DKDM student (a point of a ``family: unet2d`` search space).
        dkdm_iterations: its distillation steps.
        dkdm_init: where the DKDM students start (``method_options.init``): ``random``, the
            paper's method, or ``teacher``, a cut of the teacher's weights (studies' default).
        diffnas_space: block supernets (``family: supernet``).
        supernet_iterations, subnets_per_step, search_samples: DiffNAS supernet training and search.
        max_ratio: the DiffNAS student is the smallest tolerance's whose MACs and params are at
            most this fraction of the teacher's.
        max_params_ratio: the params' fraction, where it differs from ``max_ratio`` (a DiT's
            per-block class embeddings are params without MACs).
        diffnas_block_cost: what a tolerance minimises per block: ``macs``, or ``latency``
            (candidates timed at ``latency_batch``).
        retrain_iterations: DiffNAS retraining steps, and the Torch-Pruning peer's fine-tune.
        prune_ratios: Torch-Pruning ratios tried; the one closest to the DiffNAS student's MACs runs.
        dipgo: DiP-GO pruner options (``method_options``) for the teacher.
        dipgo_iterations, dipgo_batch, dipgo_lr: its optimisation budget.
        dipgo_budgets: budgets whose schedules are measured (teacher and stacked): fractions of the
            full trajectory's cost in the pruner's unit (``unit_cost``).
        stacked_dipgo: options of the stacked DiP-GO run on the DiffNAS student, over ``dipgo``
            (its target, say, or ``unit_cost: latency``).
        dipgo_weights_batch: the batch size DiP-GO's latency unit weights (``unit_cost: latency``)
            are measured at (None: ``latency_batch``): the speed its schedules are optimised for.
        stacked_dipgo_iterations: that run's pruner iterations (None: ``dipgo_iterations``).
        deepcache_intervals: caching intervals scanned for the one matching DiP-GO's MACs.
        step_counts: numbers of computed calls scanned for the fewer-steps peer matching DiP-GO's MACs.
        fbcache_thresholds: First Block Cache thresholds scanned for the one matching DiP-GO's MACs.
        taylorseer_intervals: TaylorSeer cache intervals scanned for the one matching DiP-GO's MACs.
        goal: the stacked model's goal: MACs reduction, FID ratio, speedup / MACs reduction.
        device: ``auto``, ``cpu`` or ``cuda``.
        seed: training seed, and the seed the preset's values were tuned on.
        eval_seed: the first noise seed of the FID sets (``--eval-seed``): the verdict is judged on
            noise the preset was not tuned on.
        tuned: which of the preset's values were chosen by looking at results, and on which seed
            (stated in the generated section).
        rows: the rows a full run measures (None: every row of :data:`~automl_diff.bench.rows.ROWS`).
        prompts_train, prompts_eval: a text-to-image teacher's prompt files (DiP-GO's pruner
            trains on the first; FID and alignment are measured on the second).
        alignment_drop: the goal's largest fall in alignment below the teacher's (judged at the
            unfavourable end of the paired difference's interval).
        goal_kind: the kind of row the goal is judged on (``stacked``, or ``method``).
        goals: further goals, each on named rows (:class:`Goal`).
        bk_sdm_variants: the BK-SDM variants the ``bk_sdm`` row measures (``base``, ``small``), one
            row each; the first is the DiffNAS student's peer at matched MACs.
        dkdm_dataset: the dataset the ``dkdm_data`` row's baseline trains the DKDM student on
            (captioned for a text-to-image teacher; None: the teacher's).
    """

    name: str
    teacher: str
    evaluation: Evaluation = field(default_factory=lambda: bench_evaluation())
    fid_sets: int = 5
    latency_batches: tuple[int, ...] = (1, 8)
    latency_warmup: int = 1
    batch_size: int = 32
    lr: float = 1e-3
    ema_decay: float = 0.99
    pool_size: int = 1024
    pool_steps: int = 50
    pool: dict[str, Any] = field(default_factory=dict)
    dkdm_space: str = str(_ROOT / "search_spaces" / "digits_dkdm.yaml")
    dkdm_params: dict[str, Any] = field(default_factory=dict)
    dkdm_iterations: int = 1500
    dkdm_init: str = "random"
    diffnas_space: str = str(_ROOT / "search_spaces" / "digits_unet.yaml")
    supernet_iterations: int = 400
    subnets_per_step: int = 3
    search_samples: int = 256
    max_ratio: float = 0.5
    max_params_ratio: float | None = None
    diffnas_block_cost: str = "macs"
    retrain_iterations: int = 1500
    prune_ratios: tuple[float, ...] = (0.25, 0.3)
    dipgo: dict[str, Any] = field(default_factory=dict)
    dipgo_iterations: int = 150
    dipgo_batch: int = 4
    dipgo_lr: float = 0.01
    dipgo_budgets: tuple[float, ...] = (0.3, 0.2)
    stacked_dipgo: dict[str, Any] = field(default_factory=dict)
    stacked_dipgo_iterations: int | None = None
    dipgo_weights_batch: int | None = None
    deepcache_intervals: tuple[int, ...] = tuple(range(2, 11))
    step_counts: tuple[int, ...] = tuple(range(2, 51))
    fbcache_thresholds: tuple[float, ...] = (0.02, 0.05, 0.08, 0.12, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.7, 1.0)
    taylorseer_intervals: tuple[int, ...] = (2, 3, 4, 5, 6, 8, 10, 12)
    goal: tuple[float, float, float] = (8.0, 1.15, 0.8)
    device: str = "auto"
    seed: int = 0
    eval_seed: int = 1
    tuned: str = ""
    rows: tuple[str, ...] | None = DEFAULT_ROWS
    prompts_train: str | None = None
    prompts_eval: str | None = None
    alignment_drop: float = 0.02
    goal_kind: str = "stacked"
    goals: tuple[Goal, ...] = ()
    bk_sdm_variants: tuple[str, ...] = ("base",)
    dkdm_dataset: str | None = None
    compiled: tuple[float, float, float] | None = None
    compiled_plan_graphs: int = 0

    @property
    def eval_seeds(self) -> tuple[int, ...]:
        """The noise seed of each FID sample set."""
        return tuple(range(self.eval_seed, self.eval_seed + self.fid_sets))

    @property
    def steps(self) -> int:
        """Denoising steps of every sampler."""
        return self.evaluation.sampling.steps

    @property
    def latency_batch(self) -> int:
        """The batch size the preset samples with, where its speed goal is judged."""
        return self.evaluation.latency_batch_size

    @property
    def timed_batches(self) -> tuple[int, ...]:
        """Every batch size rows are timed at, the preset's own last."""
        return (*sorted(set(self.latency_batches) - {self.latency_batch}), self.latency_batch)


PRESETS: dict[str, BenchPreset] = {
    "digits": BenchPreset(
        name="digits",
        teacher="digits",
        evaluation=bench_evaluation(fid_samples=500, fid_batch_size=256),
        fid_sets=5,
        pool_size=2048,
        max_ratio=0.7,
        dkdm_iterations=1000,
        dipgo_iterations=100,
        retrain_iterations=1250,
        dipgo_budgets=(0.3, 0.22),
        compiled=(0.8, 0.7, 3.0),
        dkdm_params={
            "down.0.channels": 24,
            "down.1.channels": 48,
            "down.1.layers": 1,
            "down.2.channels": 32,
            "down.2.layers": 1,
            "down.2.attention": False,
            "mid.attention": False,
        },
        dipgo={"granularity": "layer", "unit_cost": "latency", "target_macs_ratio": 0.2, "sparsity_weight": 5.0, "warmup": 0.6},
        dipgo_weights_batch=8,
        stacked_dipgo_iterations=150,
        tuned="the DiP-GO target (0.2 of the trajectory's time, below both budgets: at 0.23, budget 0.22 cut the "
        "pruner's schedule to 5 refreshes of the deeper units in 100 steps, FID 109 on seed 0, against 13.1 at 0.2), sparsity "
        "weight (5) and warm-up (0.6), the pruners' iterations "
        "(100 on the teacher, 150 on the DiffNAS student), the DiffNAS size limit (0.7 of the "
        "teacher's MACs and params) and the training budgets were chosen on earlier runs of this benchmark, whose FID noise "
        "was seed 0 (the history of BENCHMARKS.md). Measuring DiP-GO's unit weights in seconds at batch 8, and timing at "
        "batches 1, 8 and 64, were decided from the per-step costs measured on the teacher (BENCHMARKS.md), not from a "
        "benchmark run. The schedules' budgets (0.3 and 0.22 of the trajectory's measured time) are the cost ratios that the "
        "thresholds of earlier runs reached (3.66x and 4.59x fewer trajectory MACs), chosen on the MACs axis, not on FID.",
    ),
    "digits-t2i": BenchPreset(
        name="digits-t2i",
        teacher="digits-t2i",
        evaluation=bench_evaluation(
            steps=50,
            guidance_scale=1.5,
            fid_samples=500,
            fid_dataset="digits",
            fid_features="digits",
            latency_batch_size=8,
            images_per_prompt=25,
            alignment="prompt_accuracy",
        ),
        fid_sets=5,
        latency_batches=(1,),
        rows=("teacher", "dkdm", "dkdm_data", "diffnas", "bk_sdm", "dipgo", "deepcache", "stacked"),
        pool_size=2048,
        dkdm_space=str(_ROOT / "search_spaces" / "digits_t2i_dkdm.yaml"),
        dkdm_params={
            "down.0.channels": 24,
            "down.0.attention": True,
            "down.1.channels": 48,
            "down.1.layers": 1,
            "down.1.attention": True,
            "down.2.channels": 48,
            "down.2.layers": 1,
            "mid.attention": True,
        },
        dkdm_iterations=1500,
        dkdm_dataset="digits",
        diffnas_space=str(_ROOT / "search_spaces" / "digits_t2i_supernet.yaml"),
        supernet_iterations=300,
        retrain_iterations=1500,
        max_ratio=0.46,
        bk_sdm_variants=("base",),
        prompts_train=str(_ROOT / "studies" / "prompts" / "digits_train.txt"),
        prompts_eval=str(_ROOT / "studies" / "prompts" / "digits_eval.txt"),
        dipgo={"granularity": "layer", "target_macs_ratio": 0.25, "sparsity_weight": 5.0, "warmup": 0.6, "reference_images": 60},
        dipgo_iterations=100,
        dipgo_batch=4,
        dipgo_budgets=(0.25, 0.2),
        deepcache_intervals=tuple(range(2, 16)),
        stacked_dipgo={"target_macs_ratio": 0.33},
        stacked_dipgo_iterations=100,
        goal=(4.0, 1.1, 0.8),
        compiled=(0.8, 0.7, 3.0),
        compiled_plan_graphs=10,
        goal_kind="method",
        goals=(
            Goal("DiffNAS student", macs=2.0, params=2.0, fid_ratio=1.1, alignment_drop=0.02),
            Goal(
                "DiffNAS student", against="BK-SDM peer (BK-SDM-Base's rule, every down stage emptied)", fid_lower=True, matched_macs=True
            ),
            Goal("DiffNAS + DiP-GO", macs=6.0, fid_ratio=1.15),
            Goal("DiP-GO, budget", against="DeepCache peer", fid_lower=True, matched_macs=True),
            Goal("DKDM student", against="DKDM architecture, trained on the dataset", fid_ratio=1.2),
        ),
        tuned="the guidance scale (1.5: the lowest FID among 1.5, 2 and 3 whose prompt accuracy is at least 0.99, on 500 teacher "
        "images of noise seed 0). Nothing was tuned on this preset's results: the pruner's target (0.25 of the trajectory MACs) "
        "was set before it first ran, and its sparsity weight, warm-up and iterations are the digits preset's; the schedules' "
        "budgets (0.25 and 0.2 of the trajectory MACs: 4x and 5x fewer) were set before their first run, from the goal. The "
        "DiffNAS size limit (0.46 of the teacher's MACs and params) is BK-SDM-Base's MACs on this teacher (0.467, counted), so "
        "that the two are compared at equal or fewer MACs; the stacked pruner's target (0.33 of the student's trajectory) is "
        "1/6 of the teacher's over that limit; the DKDM student (channels 24/48/48) and the training budgets (1500 steps for "
        "DKDM, DiffNAS and BK-SDM alike, 300 supernet steps, 100 pruner iterations on the student) were sized from the "
        "measured seconds per step so that the preset fits 75 minutes on 2 CPU cores. A first run with 2000 steps and 400 "
        "supernet steps was stopped after its DKDM row, on time alone (it would have run about 85 minutes); its figures "
        "decided nothing here.",
    ),
    "digits-dit": BenchPreset(
        name="digits-dit",
        teacher="digits-dit",
        evaluation=bench_evaluation(
            steps=50,
            guidance_scale=1.5,
            fid_samples=500,
            fid_dataset="digits",
            fid_features="digits",
            latency_batch_size=8,
            images_per_prompt=50,
            alignment="prompt_accuracy",
        ),
        fid_sets=5,
        latency_batches=(1, 8),
        rows=("teacher", "dkdm", "diffnas", "dipgo", "fbcache", "taylorseer"),
        pool_size=2048,
        pool={"guided_pool": True, "prompt_dropout": 0.1},
        dkdm_space=str(_ROOT / "search_spaces" / "digits_dit_dkdm.yaml"),
        dkdm_params={"transformer.layers": 5, "transformer.heads": 3},
        dkdm_iterations=3000,
        dkdm_init="teacher",
        diffnas_space=str(_ROOT / "search_spaces" / "digits_dit_supernet.yaml"),
        supernet_iterations=300,
        subnets_per_step=4,
        retrain_iterations=3000,
        max_params_ratio=1.0,
        prompts_train=str(_ROOT / "studies" / "prompts" / "digits_classes_train.txt"),
        prompts_eval=str(_ROOT / "studies" / "prompts" / "digits_classes_eval.txt"),
        dipgo={"granularity": "block", "target_macs_ratio": 0.3, "sparsity_weight": 5.0, "warmup": 0.6, "reference_images": 40},
        dipgo_iterations=100,
        dipgo_batch=4,
        dipgo_budgets=(0.3, 0.25),
        goal=(3.0, 1.1, 0.8),
        goal_kind="method",
        goals=(
            Goal("DiP-GO, budget", against="FirstBlockCache peer", fid_lower=True, matched_macs=True),
            Goal("DiP-GO, budget", against="TaylorSeer peer", fid_lower=True, matched_macs=True),
            Goal("DKDM student", macs=2.0, fid_ratio=1.2),
            Goal("DiffNAS student", macs=2.0, fid_ratio=1.2),
        ),
        tuned="the DKDM student, on noise seeds 20-22 (three sets of 500, disjoint from the evaluation's): a first run of this "
        "preset on the evaluation seeds with 4 blocks of 3 heads (0.38 of the teacher's MACs) and 3000 steps missed its goal "
        "(FID ratio 1.16 [1.11, 1.22]); on seeds 20-22, 6000 steps of the same student gave 1.18 [1.12, 1.25] and 5 blocks of 3 "
        "heads (0.47 of the MACs) at 3000 steps 1.15 [1.14, 1.16], which this preset keeps. Nothing else was tuned on this "
        "preset's results: the guidance scale (1.5) is the teacher's default, set when it was trained; the pruner's options are "
        "the digits-t2i preset's with the transformer's blocks as units; the budgets (0.3 and 0.25 of the trajectory MACs: 3.3x "
        "and 4x fewer) follow from the goal (3x) and were set before the first run; the caches' settings are matched to the "
        "schedules' MACs.",
    ),
    "shapes-t2i": BenchPreset(
        name="shapes-t2i",
        teacher="shapes-t2i",
        evaluation=bench_evaluation(
            steps=25,
            guidance_scale=2.0,
            fid_samples=480,
            fid_batch_size=240,
            fid_dataset="shapes",
            fid_features="shapes",
            latency_batch_size=8,
            images_per_prompt=1,
            alignment="prompt_accuracy",
        ),
        fid_sets=5,
        latency_batches=(1,),
        rows=("teacher", "dkdm", "dkdm_data", "diffnas", "bk_sdm", "dipgo", "deepcache", "stacked"),
        pool_size=2048,
        dkdm_space=str(_ROOT / "search_spaces" / "shapes_t2i_dkdm.yaml"),
        dkdm_params={
            "down.0.channels": 24,
            "down.0.layers": 1,
            "down.0.attention": True,
            "down.1.channels": 48,
            "down.1.layers": 1,
            "down.1.attention": True,
            "down.2.channels": 48,
            "down.2.layers": 1,
            "down.2.attention": True,
            "down.3.channels": 48,
            "down.3.layers": 1,
            "mid.attention": True,
        },
        dkdm_iterations=1000,
        dkdm_dataset="shapes",
        diffnas_space=str(_ROOT / "search_spaces" / "shapes_t2i_supernet.yaml"),
        supernet_iterations=300,
        retrain_iterations=1000,
        max_ratio=0.5,
        bk_sdm_variants=("base", "small"),
        prompts_train=str(_ROOT / "studies" / "prompts" / "shapes_train.txt"),
        prompts_eval=str(_ROOT / "studies" / "prompts" / "shapes_eval.txt"),
        dipgo={"granularity": "branch", "target_macs_ratio": 0.25, "sparsity_weight": 5.0, "warmup": 0.6, "reference_images": 60},
        dipgo_iterations=100,
        dipgo_batch=4,
        dipgo_budgets=(0.25, 0.2),
        deepcache_intervals=tuple(range(2, 16)),
        stacked_dipgo={"target_macs_ratio": 0.25},
        stacked_dipgo_iterations=100,
        goal=(4.0, 1.1, 0.8),
        goal_kind="method",
        goals=(
            Goal(("DiffNAS student", "DKDM student"), against="BK-SDM peer (BK-SDM-Base)", fid_lower=True, matched_macs=True),
            Goal(("DiffNAS student", "DKDM student"), against="BK-SDM peer (BK-SDM-Small)", fid_lower=True, matched_macs=True),
            Goal("DiP-GO, budget", against="DeepCache peer", fid_lower=True, matched_macs=True),
            Goal("DiffNAS student", macs=2.0, params=2.0, fid_ratio=1.1, alignment_drop=0.02, efficiency=0.8),
            Goal("DiffNAS + DiP-GO", macs=8.0, fid_ratio=1.2, alignment_drop=0.02, efficiency=0.8),
            Goal("DKDM student", against="DKDM architecture, trained on the dataset", fid_ratio=1.2),
        ),
        tuned="the guidance scale (2: the lowest FID among 1.5, 2, 3 and 4 whose prompt accuracy is within 2 points of the "
        "best, on the 480 evaluation prompts with noise seed 0; BENCHMARKS.md, the shapes-t2i teacher). Nothing was tuned on "
        "this preset's results: every value was set before its first run. The students are held to at most 0.5 of the "
        "teacher's MACs and params (the DiffNAS goal), below both BK-SDM students (0.64 and 0.62 of the teacher's MACs, "
        "counted), so that they are compared at fewer MACs; the DKDM student (channels 24/48/48/48, one pair per level, 0.47 "
        "of the MACs) is the largest of the search space's points tried within that limit. The pruners' target, sparsity "
        "weight, warm-up and iterations are the digits-t2i preset's, their budgets (0.25 and 0.2 of the trajectory MACs) "
        "follow from the goals (4x on the teacher; 8x on the DiffNAS student at 0.5), and the training budgets (1000 steps "
        "for DKDM, DiffNAS and each BK-SDM student alike, as the shapes studies' DKDM; 300 supernet steps) were sized from "
        "the measured seconds per step so that the preset fits 120 minutes on 2 CPU cores.",
    ),
    "ddpm-cifar10": BenchPreset(
        name="ddpm-cifar10",
        teacher="google/ddpm-cifar10-32",
        evaluation=bench_evaluation(
            fid_samples=10000,
            fid_batch_size=500,
            fid_dataset="folder:" + str(_ROOT / "data" / "cifar10_train"),
            fid_features="inception",
            latency_batch_size=128,
        ),
        fid_sets=5,
        batch_size=128,
        lr=2e-4,
        ema_decay=0.999,
        pool_size=8192,
        dkdm_space=str(_ROOT / "search_spaces" / "ddpm_cifar10_dkdm.yaml"),
        dkdm_params={
            "down.0.channels": 64,
            "down.1.channels": 128,
            "down.1.layers": 2,
            "down.1.attention": True,
            "down.2.channels": 128,
            "down.2.layers": 2,
            "down.3.channels": 128,
            "down.3.layers": 2,
            "mid.attention": True,
        },
        dkdm_iterations=20000,
        diffnas_space=str(_ROOT / "search_spaces" / "ddpm_cifar10.yaml"),
        supernet_iterations=4000,
        subnets_per_step=4,
        search_samples=1024,
        retrain_iterations=20000,
        prune_ratios=(0.25, 0.3, 0.4, 0.5),
        dipgo={"granularity": "layer", "target_macs_ratio": 0.25, "sparsity_weight": 5.0, "warmup": 0.6},
        dipgo_iterations=400,
        dipgo_batch=8,
        device="cuda",
    ),
}
