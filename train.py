"""Fine-tune DeeBERT on a GLUE task in two loops (paper section 3.1).

    python train.py --task rte                       # the authors' recipe on bert-base-uncased
    python train.py --task rte --model DIR           # any BERT checkpoint directory (or hub id)

Stage 1 is ordinary BERT fine-tuning: the embeddings, every layer and the LAST off-ramp learn from the
last off-ramp's loss L_n. Stage 2 freezes all of that and trains only the other off-ramps f_1..f_{n-1}
with L_1 + ... + L_{n-1}; the final off-ramp stays exactly as good as plain fine-tuned BERT. Each stage ends
with every off-ramp's dev score; the result is one self-contained checkpoint folder that infer.py loads.

Runs on CUDA when there is a GPU, and under `torchrun --nproc_per_node=N train.py ...` with
DistributedDataParallel (each process takes every N-th example; only rank 0 prints and saves).
"""

import argparse
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from deebert.checkpoint import check_output_dir, load_deebert, resolve, save_checkpoint
from deebert.config import BertConfig
from deebert.device import pick_device
from deebert.errors import DeeBertError, Parser, number
from deebert.exit import full_pass
from deebert.glue import TASKS, find_data_dir, get_task, per_layer_metrics, read_split
from deebert.stages import prepare_stage
from deebert.tokenizer import Tokenizer, batches, check_max_length


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except where there is none (the help text then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    """The flags; a number outside its meaning (--warmup 1.5, --epochs 0) is one line of error before any work."""
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    count, positive = number(int, 1), number(float, 0, open_ends=True)  # 1, 2, ...; and (0, inf)
    p.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    p.add_argument("--model", default="bert-base-uncased", help="BERT checkpoint directory or Hugging Face hub id")
    p.add_argument("--data_dir", default=None, help="folder with the task's train.tsv and dev.tsv (else $GLUE_DIR/<TASK>, else download)")
    p.add_argument("--output_dir", default=None, help="where the fine-tuned checkpoint goes (default: runs/<task>)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    # The authors' recipe (their scripts; the same in the Hugging Face copy).
    p.add_argument("--learning_rate", type=positive, default=2e-5, help="stage 1 learning rate")
    p.add_argument("--stage2_learning_rate", type=positive, default=None, help="stage 2 learning rate (default: --learning_rate, as the paper)")
    p.add_argument("--epochs", type=positive, default=3, help="stage 1 epochs")
    p.add_argument("--stage2_epochs", type=positive, default=None, help="stage 2 epochs (default: --epochs, as the paper)")
    p.add_argument("--batch_size", type=count, default=8, help="examples per step (per process under torchrun)")
    p.add_argument("--max_length", type=int, default=128, help="tokens per input, after truncation")
    p.add_argument("--seed", type=int, default=42, help="one seed for the data order, the fresh off-ramps and dropout")
    p.add_argument("--max_grad_norm", type=positive, default=1.0, help="gradient-norm clip")
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.0, help="fraction of steps with linearly rising learning rate; then linear decay to 0")
    p.add_argument("--weight_decay", type=number(float), default=0.0, help="AdamW weight decay on weight matrices")
    p.add_argument("--adam_eps", type=positive, default=1e-8, help="AdamW epsilon")
    # Options that depart from the paper (off by default; see OffRamp in deebert/model.py and the README).
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="what an off-ramp reads: the [CLS] vector (paper) or the mean over tokens (for mean-pooled checkpoints such as all-MiniLM-L6-v2)")
    p.add_argument("--joint", action="store_true",
                   help="NOT the paper: one stage of --epochs training everything on the sum of all off-ramp losses, to compare with the two stages")
    # Size and speed.
    p.add_argument("--max_train_examples", type=count, default=None, help="train on a seeded random subset of this size (default: all)")
    p.add_argument("--max_eval_examples", type=count, default=None, help="score only the first N dev examples (default: all)")
    p.add_argument("--eval_batch_size", type=count, default=64, help="examples per batch when scoring the dev set")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision on CUDA")
    p.add_argument("--log_every", type=count, default=50, help="print a progress line every N steps")
    args = p.parse_args(argv)
    args.stage2_learning_rate = args.stage2_learning_rate or args.learning_rate
    args.stage2_epochs = args.epochs if args.stage2_epochs is None else args.stage2_epochs
    return args


# ----------------------------------------------------------------------------------------------------
# One training stage (the two losses and what each stage trains: deebert/stages.py)


class StageLoss(nn.Module):
    """One stage's loss as a module, for DistributedDataParallel to wrap (it syncs the gradients it sees)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def train_stage(stage, model, examples, args, run) -> dict:
    """Stage 1, 2 (or "joint") of paper section 3.1: freeze what the stage does not train, then AdamW over the examples."""
    trainable, loss_fn = prepare_stage(model, stage)  # stage 1: backbone + f_n on L_n; stage 2: f_1..f_{n-1}
    lr, epochs = (args.stage2_learning_rate, args.stage2_epochs) if stage == 2 else (args.learning_rate, args.epochs)
    net = StageLoss(model, loss_fn)
    if run.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.device.type == "cuda" else None)

    steps_per_epoch = math.ceil((len(examples) // run.world_size) / args.batch_size)
    total_steps = max(1, round(steps_per_epoch * epochs))
    optimizer = torch.optim.AdamW(weight_decay_groups(trainable, args.weight_decay), lr=lr, eps=args.adam_eps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule(args.warmup, total_steps))
    scaler = torch.amp.GradScaler("cuda", enabled=args.amp == "fp16")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16 if args.amp == "bf16" else torch.float16, enabled=args.amp != "none")

    run.log(f"stage {stage}: {sum(p.numel() for p in trainable):,} trainable parameters, {total_steps} steps, lr {lr:g}")
    step, seen, loss_sum, started = 0, 0, torch.zeros((), device=run.device), time.perf_counter()
    for epoch in range(math.ceil(epochs)):
        for batch in batches(run.tokenizer, examples, args.batch_size, epoch_order(len(examples), args.seed, 1 if stage == "joint" else stage, epoch, run)):
            if step == total_steps:
                break
            batch = {k: v.to(run.device) for k, v in batch.items()}
            with autocast:
                loss = net(batch)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            scale = scaler.get_scale()
            scaler.step(optimizer)  # fp16: skipped when the gradients overflowed, and the scale shrinks
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scaler.get_scale() >= scale:  # a skipped step does not advance the schedule either
                schedule.step()
            step, seen, loss_sum = step + 1, seen + len(batch["labels"]) * run.world_size, loss_sum + loss.detach()
            if step % args.log_every == 0 or step == total_steps:  # .item() waits for the GPU: only when printing
                run.log(progress_line(stage, epoch, step, total_steps, loss_sum.item() / step, seen, started))
    for p in model.parameters():
        p.requires_grad_(False)
    return {"steps": step, "examples_per_second": seen / (time.perf_counter() - started), "seconds": time.perf_counter() - started}


def weight_decay_groups(parameters, weight_decay: float) -> list:
    """Decay matrices only; biases and LayerNorm scales (1-D) are left alone, as BERT's recipes do."""
    return [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]


def linear_schedule(warmup_fraction: float, total_steps: int):
    """Learning-rate factor: rises linearly over the warm-up steps, then falls linearly to 0."""
    warmup = int(warmup_fraction * total_steps)
    return lambda step: (step + 1) / warmup if step < warmup else max(0.0, (total_steps - step) / max(1, total_steps - warmup))


def epoch_order(n: int, seed: int, stage: int, epoch: int, run) -> list:
    """A seeded shuffle, the same in every process; process r takes every world_size-th example from r (the
    tail that does not divide by world_size is dropped, so every process takes the same number of steps)."""
    generator = torch.Generator().manual_seed(seed * 1000 + stage * 100 + epoch)
    order = torch.randperm(n, generator=generator).tolist()
    order = order[: n - n % run.world_size]
    return order[run.rank :: run.world_size]


def progress_line(stage, epoch, step, total_steps, mean_loss, seen, started) -> str:
    elapsed = time.perf_counter() - started
    left = elapsed / step * (total_steps - step)
    return (f"stage {stage} | epoch {epoch + 1} | step {step:>5}/{total_steps} | loss {mean_loss:.4f} | "
            f"{seen / elapsed:6.1f} examples/s | {format_seconds(elapsed)} elapsed, {format_seconds(left)} left")


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def per_layer_table(results: list, task, trained_layers: int) -> str:
    """The paper's per-layer view: one row per off-ramp, its metric(s) on the dev set."""
    header = "layer | " + " | ".join(f"{m:>8}" for m in task.metrics)
    rows = [header, "-" * len(header)]
    for layer, metrics in enumerate(results, start=1):
        note = "" if layer > len(results) - trained_layers else "  (not trained yet)"
        rows.append(f"{layer:>5} | " + " | ".join(f"{100 * metrics[m]:8.2f}" for m in task.metrics) + note)
    return "\n".join(rows)


# ----------------------------------------------------------------------------------------------------
# Processes, devices, main


class Run:
    """What one process knows: its rank, the device, the tokenizer, and whether it may print.

    Under torchrun every process checks --device as a single process does (so a missing GPU is an error,
    never a silent CPU run); on GPUs process r of a machine takes GPU LOCAL_RANK, and NCCL is bound to it.
    """

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(args.device)
        if self.world_size > 1:
            if self.device.type == "cuda":
                self.device = pick_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")  # more processes than GPUs: an error
                torch.cuda.set_device(self.device)
                dist.init_process_group("nccl", device_id=self.device)
            else:
                dist.init_process_group("gloo")
        self.tokenizer = None  # set once the checkpoint is known

    def log(self, message=""):
        if self.rank == 0:
            print(message, flush=True)

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def load_data(task, args, run):
    data_dir = find_data_dir(task, args.data_dir)
    train = read_split(task, data_dir, "train")
    dev = read_split(task, data_dir, task.dev_splits[0])
    if args.max_train_examples and args.max_train_examples < len(train):
        keep = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[: args.max_train_examples]
        train = [train[i] for i in sorted(keep.tolist())]
    dev = dev[: args.max_eval_examples]
    if len(train) < run.world_size:
        raise DeeBertError(f"{len(train)} training examples cannot be shared among {run.world_size} processes")
    run.log(f"data: {len(train):,} train and {len(dev):,} dev examples from {data_dir}")
    return train, dev


def main(argv=None):
    args = parse_args(argv)
    task = get_task(args.task)
    output_dir = Path(args.output_dir or Path("runs") / task.name)
    model_dir = resolve(args.model)
    check_max_length(args.max_length, BertConfig.from_file(model_dir / "config.json").max_position_embeddings)
    run = Run(args)
    if args.amp != "none" and run.device.type != "cuda":
        raise DeeBertError(f"--amp {args.amp} needs a GPU, and this run is on {run.device}; drop --amp")
    if run.rank == 0:
        check_output_dir(output_dir, args.overwrite)
    train, dev = load_data(task, args, run)

    torch.manual_seed(args.seed)  # the fresh off-ramp classifiers, dropout, and everything after
    model = load_deebert(model_dir, labels=list(task.label_names), pooling=args.pooling)  # float32, whatever the file
    model.config.task = task.name
    model.to(run.device)
    run.tokenizer = Tokenizer.from_dir(model_dir, max_length=args.max_length)
    run.log(f"model: {model_dir} ({model.num_layers} layers, hidden {model.config.hidden_size}, "
            f"off-ramps read {args.pooling}), device {run.device}, {torch.get_num_threads()} threads, {run.world_size} process(es)")

    results = {}
    for stage in ("joint",) if args.joint else (1, 2):
        stats = train_stage(stage, model, train, args, run)
        if run.rank == 0:
            started = time.perf_counter()
            per_layer = per_layer_metrics(task, *full_pass(model, batches(run.tokenizer, dev, args.eval_batch_size)))
            run.log(f"\nstage {stage} done in {format_seconds(stats['seconds'])} "
                    f"({stats['examples_per_second']:.1f} examples/s); dev, every off-ramp "
                    f"({format_seconds(time.perf_counter() - started)}):")
            run.log(per_layer_table(per_layer, task, trained_layers=1 if stage == 1 else model.num_layers) + "\n")
            results[f"stage{stage}"] = {**stats, "dev_per_layer": per_layer}
        run.barrier()

    if run.rank == 0:
        save_checkpoint(model, run.tokenizer, output_dir, overwrite=args.overwrite, extra_json={
            "training_args.json": vars(args),
            "results.json": {"task": task.name, "dev_split": task.dev_splits[0], "num_dev_examples": len(dev), **results},
        })
        example = '"premise" "hypothesis"' if task.is_pair else '"some text"'
        run.log(f"saved {output_dir}; try: python infer.py --model {output_dir} {example} --S 0.3")
    run.barrier()
    if run.world_size > 1:
        dist.destroy_process_group()
    return model, results


if __name__ == "__main__":
    try:
        main()  # a bad flag, a missing file, ...: a DeeBertError, one line
    except DeeBertError as err:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: one line is enough
            sys.exit(err.report())
        time.sleep(2)  # the others wait, so torchrun does not stop rank 0 before it has printed
        sys.exit(2)
