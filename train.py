"""Fine-tune DeeBERT on a GLUE task in two loops (paper section 3.1).

    python train.py --task rte                       # the authors' recipe on bert-base-uncased
    python train.py --task rte --model DIR           # any BERT checkpoint directory (or hub id)
    python train.py --task rte --layers 3            # the static baseline: only the checkpoint's first 3 layers

Stage 1 is ordinary BERT fine-tuning: the embeddings, every layer and the LAST off-ramp learn from the
last off-ramp's loss L_n. Stage 2 freezes all of that and trains only the other off-ramps f_1..f_{n-1}
with L_1 + ... + L_{n-1}; the final off-ramp stays exactly as good as plain fine-tuned BERT. Each stage ends
with every off-ramp's dev score; the result is one self-contained checkpoint folder that infer.py loads.

Runs on CUDA when there is a GPU (bf16 autocast where the GPU has it), and under
`torchrun --nproc_per_node=N train.py ...` with DistributedDataParallel (each process takes every N-th
example; only rank 0 prints and saves).
"""

import argparse
import functools
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
from deebert.device import autocast, model_inputs, pick_device, pick_dtype, to_device, use_tf32
from deebert.errors import DeeBertError, Parser, number
from deebert.glue import TASKS, find_data_dir, get_task, per_layer_metrics, read_split
from deebert.stages import prepare_stage
from deebert.tokenizer import Tokenizer, batches, by_length, check_max_length
from deebert.tradeoff import full_pass


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every default, except where there is none (the help text then says what happens)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None):
    """The flags; a number outside its meaning (--warmup 1.5, --epochs 0) is one line of error before any work."""
    p = Parser(prog="train.py", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    count = number(int, 1)  # 1, 2, ...
    positive = number(float, 0, open_ends=True)  # (0, inf)
    p.add_argument("--task", required=True, help=f"GLUE task: {', '.join(TASKS)}")
    p.add_argument("--model", default="bert-base-uncased", help="BERT checkpoint directory or Hugging Face hub id")
    p.add_argument("--data_dir", default=None,
                   help="folder with the task's train.tsv and dev.tsv (else $GLUE_DIR/<TASK>, else download)")
    p.add_argument("--output_dir", default=None,
                   help="where the fine-tuned checkpoint goes (default: runs/<task>; runs/<task>-k<K> with --layers)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_dir")
    # The authors' recipe: their scripts' values, the same in the Hugging Face copy (the paper gives none).
    p.add_argument("--learning_rate", type=positive, default=2e-5, help="stage 1 learning rate")
    p.add_argument("--stage2_learning_rate", type=positive, default=None,
                   help="stage 2 learning rate (default: --learning_rate, as the authors' scripts)")
    p.add_argument("--epochs", type=positive, default=3, help="stage 1 epochs")
    p.add_argument("--stage2_epochs", type=positive, default=None,
                   help="stage 2 epochs (default: --epochs, as the authors' scripts)")
    p.add_argument("--batch_size", type=count, default=8, help="examples per step (per process under torchrun)")
    p.add_argument("--max_length", type=int, default=128, help="tokens per input, after truncation")
    p.add_argument("--seed", type=int, default=42, help="one seed for the data order, the fresh off-ramps and dropout")
    p.add_argument("--max_grad_norm", type=positive, default=1.0, help="gradient-norm clip")
    p.add_argument("--warmup", type=number(float, 0, 1), default=0.0,
                   help="fraction of steps with linearly rising learning rate; then linear decay to 0")
    p.add_argument("--weight_decay", type=number(float), default=0.0, help="AdamW weight decay on weight matrices")
    p.add_argument("--adam_eps", type=positive, default=1e-8, help="AdamW epsilon")
    # Options that depart from the paper (off by default; see OffRamp in deebert/model.py and the README).
    p.add_argument("--pooling", choices=["cls", "mean"], default="cls",
                   help="what an off-ramp reads: the [CLS] vector (paper) or the mean over tokens "
                        "(for mean-pooled checkpoints such as all-MiniLM-L6-v2)")
    p.add_argument("--joint", action="store_true",
                   help="NOT the paper: one stage of --epochs training everything on the sum of all off-ramp "
                        "losses, to compare with the two stages")
    p.add_argument("--layers", type=count, default=None,
                   help="keep only the checkpoint's first K layers: the static model DeeBERT is compared with "
                        "(default: all)")
    # Size and speed.
    p.add_argument("--max_train_examples", type=count, default=None,
                   help="train on a seeded random subset of this size (default: all)")
    p.add_argument("--max_eval_examples", type=count, default=None, help="score only the first N dev examples")
    p.add_argument("--eval_batch_size", type=count, default=None,
                   help="examples per batch when scoring the dev set (default: 64 on a CPU, 256 on a GPU)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--amp", choices=["auto", "none", "bf16", "fp16"], default="auto",
                   help="mixed precision on CUDA; auto: bf16 where the GPU has it, else none (fp32)")
    p.add_argument("--log_every", type=count, default=50, help="print a progress line every N steps")
    args = p.parse_args(argv)
    args.stage2_learning_rate = args.stage2_learning_rate or args.learning_rate
    args.stage2_epochs = args.epochs if args.stage2_epochs is None else args.stage2_epochs
    return args


# ----------------------------------------------------------------------------------------------------
# One training stage (the two losses and what each stage trains: deebert/stages.py)

SHUFFLE_SEEDS = {"stage 1": 1, "stage 2": 2, "joint": 1}  # each stage's data order; joint shuffles as stage 1


class StageLoss(nn.Module):
    """One stage's loss as a module, for DistributedDataParallel to wrap (it syncs the gradients it sees)."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch):
        return self.loss_fn(self.model, batch)


def train_stage(stage: str, model, examples, tokenizer, args, run) -> dict:
    """"stage 1", "stage 2" (or "joint") of paper section 3.1: freeze what the stage does not train, then AdamW."""
    trainable, loss_fn = prepare_stage(model, stage)  # stage 1: backbone + f_n on L_n; stage 2: f_1..f_{n-1}
    lr = args.stage2_learning_rate if stage == "stage 2" else args.learning_rate
    epochs = args.stage2_epochs if stage == "stage 2" else args.epochs
    net = StageLoss(model, loss_fn)
    if run.world_size > 1:
        net = nn.parallel.DistributedDataParallel(net, device_ids=[run.device.index] if run.on_gpu else None)

    steps_per_epoch = math.ceil((len(examples) // run.world_size) / args.batch_size)
    total_steps = max(1, round(steps_per_epoch * epochs))
    optimizer = torch.optim.AdamW(weight_decay_groups(trainable, args.weight_decay), lr=lr, eps=args.adam_eps,
                                  fused=run.on_gpu)  # one kernel for all parameters on a GPU
    warmup_steps = int(args.warmup * total_steps)
    factor = functools.partial(learning_rate_factor, warmup_steps=warmup_steps, total_steps=total_steps)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    scaler = torch.amp.GradScaler("cuda", enabled=run.amp == torch.float16)  # fp16 only: bf16 needs no scaling

    run.log(f"{stage}: {sum(p.numel() for p in trainable):,} trainable parameters, {total_steps} steps, lr {lr:g}")
    step = 0
    seen = 0
    loss_sum = torch.zeros((), device=run.device)
    started = time.perf_counter()
    for epoch in range(math.ceil(epochs)):
        order = epoch_order(len(examples), args.seed * 1000 + SHUFFLE_SEEDS[stage] * 100 + epoch, run)
        for batch in batches(tokenizer, examples, args.batch_size, order):
            if step == total_steps:
                break
            inputs = {**model_inputs(batch, run.device), "labels": to_device(batch["labels"], run.device)}
            with autocast(run.device, run.amp):
                loss = net(inputs)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(trainable, args.max_grad_norm)
            scale = scaler.get_scale() if scaler.is_enabled() else None
            scaler.step(optimizer)  # fp16: skipped when the gradients overflowed, and the scale shrinks
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            if scale is None or scaler.get_scale() >= scale:  # a skipped step does not advance the schedule either
                schedule.step()
            step += 1
            seen += len(batch["labels"]) * run.world_size
            loss_sum += loss.detach()
            if step % args.log_every == 0 or step == total_steps:  # .item() waits for the GPU: only when printing
                run.log(progress_line(stage, epoch, step, total_steps, loss_sum.item() / step, seen, started))
    for p in model.parameters():
        p.requires_grad_(False)
    seconds = time.perf_counter() - started
    mean_loss = loss_sum.item() / max(1, step)
    return {"steps": step, "mean_loss": mean_loss, "examples_per_second": seen / seconds, "seconds": seconds}


def weight_decay_groups(parameters, weight_decay: float) -> list:
    """Decay matrices only; biases and LayerNorm scales (1-D) are left alone, as BERT's recipes do."""
    return [{"params": [p for p in parameters if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in parameters if p.ndim < 2], "weight_decay": 0.0}]


def learning_rate_factor(step: int, warmup_steps: int, total_steps: int) -> float:
    """The learning rate's factor at `step`: rising linearly over the warm-up steps, then falling linearly to 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def epoch_order(n: int, seed: int, run) -> list:
    """A seeded shuffle, the same in every process; process r takes every world_size-th example from r (the
    tail that does not divide by world_size is dropped, so every process takes the same number of steps)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    order = order[: n - n % run.world_size]
    return order[run.rank :: run.world_size]


def progress_line(stage, epoch, step, total_steps, mean_loss, seen, started) -> str:
    elapsed = time.perf_counter() - started
    left = elapsed / step * (total_steps - step)
    return (f"{stage} | epoch {epoch + 1} | step {step:>5}/{total_steps} | loss {mean_loss:.4f} | "
            f"{seen / elapsed:6.1f} examples/s | {format_seconds(elapsed)} elapsed, {format_seconds(left)} left")


def format_seconds(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes}m{seconds:02d}s"


def evaluate(model, tokenizer, dev, task, args, run) -> list:
    """Every off-ramp's metrics on the dev set: one full pass, sorted by length, under the training's autocast."""
    model.eval()
    order = by_length(tokenizer, dev)
    with autocast(run.device, run.amp):
        return per_layer_metrics(task, *full_pass(model, batches(tokenizer, dev, args.eval_batch_size, order)))


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
    """What one process knows: its rank, the device and the precision, and whether it may print.

    Under torchrun every process checks --device as a single process does (so a missing GPU is an error,
    never a silent CPU run); on GPUs process r of a machine takes GPU LOCAL_RANK, and NCCL is bound to it.
    """

    def __init__(self, args):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = pick_device(args.device)
        if self.world_size > 1 and self.device.type == "cuda":  # more processes than GPUs: an error
            self.device = pick_device(f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
        self.on_gpu = self.device.type == "cuda"
        self.amp = pick_dtype("fp32" if args.amp == "none" else args.amp, self.device, flag="--amp")
        if self.world_size > 1 and self.on_gpu:
            torch.cuda.set_device(self.device)
            dist.init_process_group("nccl", device_id=self.device)
        elif self.world_size > 1:
            dist.init_process_group("gloo")
        use_tf32(self.device)  # fp32 matrix products in TF32 on a GPU; nothing changes on a CPU

    def log(self, message=""):
        if self.rank == 0:
            print(message, flush=True)

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(device_ids=[self.device.index] if self.on_gpu else None)


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
    default_dir = Path("runs") / (task.name if args.layers is None else f"{task.name}-k{args.layers}")
    output_dir = Path(args.output_dir or default_dir)
    model_dir = resolve(args.model)
    check_max_length(args.max_length, BertConfig.from_file(model_dir / "config.json").max_position_embeddings)
    run = Run(args)
    args.eval_batch_size = args.eval_batch_size or (256 if run.on_gpu else 64)
    if run.rank == 0:
        check_output_dir(output_dir, args.overwrite)

    torch.manual_seed(args.seed)  # the fresh off-ramp classifiers, dropout, and everything after
    model = load_deebert(model_dir, labels=list(task.label_names), pooling=args.pooling, num_layers=args.layers)
    model.config.task = task.name
    model.to(run.device)  # float32 weights, whatever the file stores: autocast computes in 16 bits
    tokenizer = Tokenizer.from_dir(model_dir, max_length=args.max_length)
    train, dev = load_data(task, args, run)
    run.log(f"model: {model_dir} ({model.num_layers} layers, hidden {model.config.hidden_size}, off-ramps read "
            f"{args.pooling}), device {run.device}, {str(run.amp).removeprefix('torch.')}, "
            f"{torch.get_num_threads()} threads, {run.world_size} process(es)")

    results = {}
    stages = ("joint",) if args.joint else ("stage 1", "stage 2")
    if model.num_layers == 1:  # its one off-ramp is the last: stage 1 trains it, and stage 2 has nothing to train
        stages = stages[:1]
    for stage in stages:
        stats = train_stage(stage, model, train, tokenizer, args, run)
        if run.rank == 0:
            started = time.perf_counter()
            per_layer = evaluate(model, tokenizer, dev, task, args, run)
            run.log(f"\n{stage} done in {format_seconds(stats['seconds'])} "
                    f"({stats['examples_per_second']:.1f} examples/s); dev, every off-ramp "
                    f"({format_seconds(time.perf_counter() - started)}):")
            run.log(per_layer_table(per_layer, task, trained_layers=1 if stage == "stage 1" else model.num_layers))
            run.log()
            results[stage.replace(" ", "")] = {**stats, "dev_per_layer": per_layer}  # "stage1", "stage2", "joint"
        run.barrier()

    if run.rank == 0:
        labels = torch.tensor([example.label for example in dev])
        summary = {"task": task.name, "dev_split": task.dev_splits[0], "num_dev_examples": len(dev),
                   "dev_majority_class": float(labels.bincount().max()) / len(dev), **results}
        save_checkpoint(model, tokenizer, output_dir, overwrite=args.overwrite,
                        extra_json={"training_args.json": vars(args), "results.json": summary})
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
