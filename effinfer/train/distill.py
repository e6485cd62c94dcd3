"""``effinfer distill``: knowledge distillation of a teacher model into a smaller student.

Papers: Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural Network"; Gu et al. 2023,
"MiniLLM: Knowledge Distillation of Large Language Models" (reverse KL).
Idea: the student learns from the teacher's whole next-token distribution, not just the one token the
text has: loss = w * T^2 * KL(teacher_T || student_T) + (1 - w) * cross-entropy, with both softmaxes
taken at temperature T (the T^2 keeps the soft targets' gradient on the scale of the hard ones).
MiniLLM's reverse KL(student || teacher) makes the student seek the teacher's modes instead of
covering all of them (``--kd-loss reverse``). ``--hidden-weight`` adds a match of the final hidden
states (MSE through a learned projection when the widths differ).

    effinfer distill --teacher T --data texts/ --out student --hidden-size 128 --layers 4 --max-steps 1000
    effinfer distill --teacher T --data texts/ --out baseline ... --kd-weight 0   # the same run, no teacher
    torchrun --nproc_per_node 2 -m effinfer.train.distill --teacher T --data texts/ --out student

The student is a fresh model from ``effinfer train``'s model flags, or ``--student S``; it takes the
teacher's tokenizer (the data is encoded with it and it is written to the output) and the teacher's
vocabulary size. Everything else is ``effinfer train``: the same flags, data pipeline, loop, DDP,
checkpoints and export; only the loss differs. ``--kd-weight 0`` (without ``--hidden-weight``) never
runs the teacher and is plain training of the same student on the same tokens, the honest baseline.
The teacher is anything effinfer loads (HF directory or GGUF), frozen, run in float32 without
autograd on the same batches. ``--teacher-topk K`` runs the teacher once instead and trains from its
cached top-K distribution (``teacher_topk.py``). ``--embedding-from-teacher`` starts a fresh student's
token embedding (and output head) from the teacher's, cut to the student's width by a truncated SVD.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import nn

from effinfer.loading.checkpoint import Checkpoint, open_checkpoint
from effinfer.loading.safetensors import find_weight_files
from effinfer.models.base import CausalLM
from effinfer.train import add_arguments as add_train_arguments
from effinfer.train import run as run_training
from effinfer.train.config import TrainConfig
from effinfer.train.distributed import init_distributed
from effinfer.train.teacher_topk import CachedDistillationLoss, CachedTeacher, build_teacher_cache
from effinfer.train.trainer import Trainer

KD_LOSSES = ("forward", "reverse")


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    targets: torch.Tensor,
    kd_weight: float,
    temperature: float = 1.0,
    kd_loss: str = "forward",
) -> torch.Tensor:
    """``kd_weight`` * T² * KL at temperature T + (1 - ``kd_weight``) * next-token cross-entropy.

    Logits are [..., vocab]; the KL is summed over the vocabulary and averaged over positions, as the
    cross-entropy is. ``kd_loss`` "forward" is KL(teacher ‖ student), "reverse" KL(student ‖ teacher).
    """
    student_logits = student_logits.float()  # softmax in float32, even under bf16 autocast
    cross_entropy = F.cross_entropy(student_logits.flatten(0, -2), targets.flatten())
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kd_loss == "forward":
        kl = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    else:
        kl = (student_log_probs.exp() * (student_log_probs - teacher_log_probs)).sum(-1)
    return kd_weight * temperature**2 * kl.mean() + (1.0 - kd_weight) * cross_entropy


def hidden_state_loss(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, projection: nn.Module
) -> torch.Tensor:
    """Mean squared error between the teacher's final hidden states and the student's, projected to its width."""
    return F.mse_loss(projection(student_hidden).float(), teacher_hidden.float())


class FrozenTeacher:
    """The teacher's final hidden states and logits for a batch: float32, no autograd, no autocast.

    Deliberately not an ``nn.Module``: held by the loss module, its weights stay out of the optimizer,
    of ``DistributedDataParallel``'s gradient buckets and buffer broadcasts, and of the checkpoint.
    """

    def __init__(self, model: CausalLM) -> None:
        self.model = model.requires_grad_(False).eval()
        self.hidden_size = model.config.hidden_size

    @torch.no_grad()
    def __call__(self, inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast(inputs.device.type, enabled=False):
            hidden = self.model.forward_dense(inputs)
            return hidden.float(), self.model.compute_logits(hidden).float()


class DistillationLoss(nn.Module):
    """``loss(inputs, targets)`` of the student against the teacher and the text (``NextTokenLoss``'s interface).

    With ``hidden_weight`` it adds that times ``hidden_state_loss``; a student narrower or wider than
    the teacher gets a learned linear projection to the teacher's width (FitNets, Romero et al. 2015),
    trained with the student and kept in the training checkpoint, not in the exported model.
    """

    def __init__(
        self,
        model: CausalLM,
        teacher: FrozenTeacher,
        kd_weight: float,
        temperature: float,
        kd_loss: str,
        hidden_weight: float = 0.0,
    ) -> None:
        super().__init__()
        self.model = model
        self.teacher = teacher
        self.kd_weight, self.temperature, self.kd_loss = kd_weight, temperature, kd_loss
        self.hidden_weight = hidden_weight
        width = model.config.hidden_size
        if hidden_weight > 0 and width != teacher.hidden_size:
            device = next(model.parameters()).device
            self.projection = nn.Linear(width, teacher.hidden_size, bias=False, device=device)
        else:
            self.projection = nn.Identity()

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        student_hidden = self.model.forward_dense(inputs)
        student_logits = self.model.compute_logits(student_hidden)
        teacher_hidden, teacher_logits = self.teacher(inputs)
        loss = distillation_loss(
            student_logits, teacher_logits, targets, self.kd_weight, self.temperature, self.kd_loss
        )
        if self.hidden_weight > 0:
            loss = loss + self.hidden_weight * hidden_state_loss(
                student_hidden, teacher_hidden, self.projection
            )
        return loss


@dataclass
class DistillConfig(TrainConfig):
    """A training run plus the teacher and the loss mix; ``init`` is the ``--student``."""

    teacher: Path | None = None
    kd_weight: float = 0.5
    kd_temperature: float = 1.0
    kd_loss: str = "forward"
    hidden_weight: float = 0.0
    teacher_topk: int | None = None
    teacher_cache: Path | None = None
    embedding_from_teacher: bool = False

    def __post_init__(self) -> None:
        if self.teacher is None:
            raise ValueError("--teacher is required")
        self.teacher = Path(self.teacher)
        if not self.teacher.exists():
            raise ValueError(f"--teacher {str(self.teacher)!r} does not exist")
        if self.init is not None and not (Path(self.init) / "config.json").is_file():
            raise ValueError(f"--student {str(self.init)!r} is not an HF model directory (no config.json)")
        if not 0 <= self.kd_weight <= 1:
            raise ValueError(f"--kd-weight must be in [0, 1], got {self.kd_weight}")
        if not self.kd_temperature > 0:
            raise ValueError(f"--kd-temperature must be positive, got {self.kd_temperature}")
        if not self.hidden_weight >= 0:
            raise ValueError(f"--hidden-weight must be 0 or more, got {self.hidden_weight}")
        if self.teacher_topk is not None and self.teacher_topk < 1:
            raise ValueError(f"--teacher-topk must be at least 1, got {self.teacher_topk}")
        if self.teacher_topk is not None and self.hidden_weight > 0:
            raise ValueError(
                "--hidden-weight needs the teacher's hidden states, which --teacher-topk does not cache"
            )
        if self.embedding_from_teacher and self.init is not None:
            raise ValueError(
                "--embedding-from-teacher initialises a fresh student; it cannot be used with --student"
            )
        self.teacher_cache = Path(self.teacher_cache) if self.teacher_cache else None
        if self.kd_loss not in KD_LOSSES:
            raise ValueError(f"--kd-loss must be one of {', '.join(KD_LOSSES)}, got {self.kd_loss!r}")
        super().__post_init__()

    @property
    def runs_teacher(self) -> bool:
        """Whether any loss term needs the teacher (``--kd-weight 0`` alone is plain training)."""
        return self.kd_weight > 0 or self.hidden_weight > 0


class DistillTrainer(Trainer):
    """``Trainer`` whose data uses the teacher's tokenizer and whose loss is ``DistillationLoss``."""

    cfg: DistillConfig

    def __init__(self, config: DistillConfig) -> None:
        self.teacher_checkpoint = teacher = open_checkpoint(config.teacher)  # config and tokenizer only
        self.teacher_vocab = teacher.model_config.vocab_size
        if config.init is not None:
            student_vocab = json.loads((config.init / "config.json").read_text()).get("vocab_size")
            if student_vocab != self.teacher_vocab:
                raise ValueError(
                    f"--student {config.init} has a vocabulary of {student_vocab} tokens, the teacher "
                    f"{teacher.path.name} {self.teacher_vocab}: they must share one tokenizer"
                )
        context = teacher.model_config.max_position_embeddings
        if config.teacher_topk is not None and config.teacher_topk > self.teacher_vocab:
            raise ValueError(
                f"--teacher-topk {config.teacher_topk} exceeds the teacher's vocabulary of {self.teacher_vocab}"
            )
        if config.runs_teacher and config.seq_len > context:
            raise ValueError(f"--seq-len {config.seq_len} exceeds the teacher's context of {context} tokens")
        config.tokenizer_dir = teacher_tokenizer_dir(teacher, config.out / "training" / "teacher-tokenizer")
        super().__init__(config)

    def _scratch_config(self) -> dict:
        # The teacher's vocabulary, padding included: the student's logits line up with the teacher's.
        return {**super()._scratch_config(), "vocab_size": self.teacher_vocab}

    def build_loss(self) -> nn.Module:
        # Called once the fresh model exists and before a checkpoint is restored (which then overrides it).
        if self.cfg.embedding_from_teacher:
            self._init_embedding_from_teacher()
        if not self.cfg.runs_teacher:
            return super().build_loss()  # plain next-token training: the baseline runs no teacher
        if self.cfg.teacher_topk is not None:
            return self._cached_loss()
        teacher_model = self.teacher_checkpoint.load_model(
            torch.float32,
            self.device,
            self.teacher_checkpoint.model_config.max_position_embeddings,
            show_progress=False,
        )
        return DistillationLoss(
            self.model,
            FrozenTeacher(teacher_model),
            self.cfg.kd_weight,
            self.cfg.kd_temperature,
            self.cfg.kd_loss,
            self.cfg.hidden_weight,
        )

    def _rows_read(self) -> np.ndarray:
        """The distinct training rows the whole run reads, inputs only, in the order first read."""
        positions = self.order.take(0, self.cfg.max_steps * self.global_batch)
        _, first = np.unique(positions, return_index=True)
        rows = self.train_data.rows(positions[np.sort(first)])
        return rows[:, :-1].numpy()

    def _cached_loss(self) -> nn.Module:
        cfg = self.cfg
        rows = self._rows_read()
        directory = cfg.teacher_cache or self.state_dir / "teacher-topk"
        build = partial(
            build_teacher_cache, cfg.teacher, rows, directory, cfg.teacher_topk, cfg.kd_temperature
        )
        if self.dist.is_main:  # rank 0 runs the teacher; the others wait, then open its files
            build(threads=cfg.threads)
        self.dist.barrier()
        cache = build(show_progress=False)  # complete by now: only opens it
        return CachedDistillationLoss(
            self.model, CachedTeacher(cache, rows), cfg.kd_weight, cfg.kd_temperature, cfg.kd_loss
        )

    @torch.no_grad()
    def _init_embedding_from_teacher(self) -> None:
        """The teacher's input embedding cut to the student's width; an untied student's head gets the same."""
        embedding = truncated_svd_rows(
            teacher_embedding(self.teacher_checkpoint), self.model.config.hidden_size
        )
        self.model.get_submodule(self.model.embedding_module).weight.copy_(embedding)
        if not self.model.config.tie_word_embeddings:
            self.model.lm_head.weight.copy_(embedding)


def truncated_svd_rows(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    """U_r S_r of ``matrix`` [n, d] (n ≥ d): its rows in the best rank-``rank`` basis, [n, rank].

    ``U_r S_r V_rᵀ`` is the closest rank-r matrix to ``matrix`` (Eckart–Young), so a student whose
    embedding (and tied head) is ``U_r S_r`` can express the teacher's logits for any final hidden state
    in the span of ``V_r``. Computed from the eigenvectors of the d × d Gram matrix (float32 product,
    float64 eigensolver: a float64 product of a 151k-row matrix takes minutes on a CPU).
    """
    if rank > matrix.shape[1]:
        raise ValueError(f"the student is wider ({rank}) than the teacher's embedding ({matrix.shape[1]})")
    matrix = matrix.float()
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix.T @ matrix).double())  # ascending
    basis = eigenvectors[:, eigenvalues.argsort(descending=True)[:rank]].float()
    return matrix @ basis


def teacher_embedding(teacher: Checkpoint) -> torch.Tensor:
    """The teacher's input embedding [vocab, hidden] in float32, read on its own (no model is built)."""
    if teacher.gguf is not None:
        return teacher.gguf.tensor("token_embd.weight").float()
    for file in find_weight_files(teacher.path):
        with safe_open(str(file), framework="pt", device="cpu") as f:
            if "model.embed_tokens.weight" in f.keys():
                return f.get_tensor("model.embed_tokens.weight").float()
    raise ValueError(f"the teacher {teacher.path} has no model.embed_tokens.weight to start the student from")


def teacher_tokenizer_dir(teacher: Checkpoint, gguf_target: Path) -> Path:
    """An HF tokenizer directory of the teacher: its own, or, for a GGUF file, one written to ``gguf_target``."""
    if teacher.gguf is None:
        return teacher.path
    dist = init_distributed()  # the trainer's own call finds the process group already set up
    if dist.is_main:
        teacher.tokenizer.save(gguf_target)
    dist.barrier()
    return gguf_target


DESCRIPTION = __doc__.split("\n")[0].replace("``", "")
# (flag, DistillConfig field, help) of the loss's numbers.
LOSS_FLAGS = (
    ("--kd-weight", "kd_weight", "share of the KL term; the rest is cross-entropy on the text (0: no teacher)"),
    ("--kd-temperature", "kd_temperature", "softmax temperature T of teacher and student"),
    ("--hidden-weight", "hidden_weight", "add this times the MSE of the final hidden states (a learned "
     "projection maps the student's width to the teacher's); 0: off"),
)  # fmt: skip


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """``effinfer train``'s flags (data, student model, optimisation, output) plus the teacher and the loss."""
    add_train_arguments(parser)
    kd = parser.add_argument_group("distillation")
    kd.add_argument("--teacher", required=True, metavar="PATH", help="HF model directory or GGUF file")
    kd.add_argument(
        "--student",
        dest="init",
        metavar="PATH",
        help="start the student from this HF model directory (same as --init; default: a fresh model "
        "from the model flags); it must have the teacher's vocabulary",
    )
    for flag, field_name, text in LOSS_FLAGS:
        kd.add_argument(flag, type=float, default=getattr(DistillConfig, field_name), help=text)
    kd.add_argument(
        "--teacher-topk",
        type=int,
        metavar="K",
        help="run the teacher once over the rows the run reads and train from its cached top-K "
        "log-probabilities (the rest as one tail bucket); default: the teacher runs on every batch",
    )
    kd.add_argument(
        "--teacher-cache",
        metavar="DIR",
        help="where the top-K cache lives (default: OUT/training/teacher-topk)",
    )
    kd.add_argument(
        "--embedding-from-teacher",
        action="store_true",
        help="start a fresh student's embedding (and output head) from the teacher's, by truncated SVD",
    )
    kd.add_argument(
        "--kd-loss",
        choices=KD_LOSSES,
        default=DistillConfig.kd_loss,
        help="forward: KL(teacher || student) (Hinton et al.); reverse: KL(student || teacher) (MiniLLM)",
    )
    return parser


run = partial(
    run_training, config_class=DistillConfig, trainer_class=DistillTrainer, command="effinfer distill"
)


def register(subparsers) -> None:
    """Adds ``distill`` to the ``effinfer`` subcommands."""
    help_text = "distill a teacher model into a smaller student (also under torchrun)"
    parser = subparsers.add_parser("distill", help=help_text, description=DESCRIPTION)
    add_arguments(parser).set_defaults(func=run)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="effinfer distill", description=DESCRIPTION)
    return run(add_arguments(parser).parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
