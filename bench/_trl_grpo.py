"""TRL's GRPOTrainer on paceflow's task, run by bench/vs_trl.py inside its bench-only environment (TRL is never a
project dependency). Reads one JSON job from argv[1], trains, saves the policy to job["out"]/final and writes
job["out"]/trl.json: per-step end times (seconds since the first step began) and TRL's own logged metrics.

The prompts, the chat template and the verifier are paceflow's own (configs.load + actors.tasks), so both systems
see the same questions, the same formatted prompts and the same rewards."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    job = json.loads(sys.argv[1])
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from actors.tasks import build_task
    from cluster.models import resolve_model_dir
    from configs.load import load_config

    torch.set_num_threads(job["threads"])
    cfg = load_config(job["config"], job["overrides"])
    task = build_task(cfg.task)
    by_id = {p.prompt_id: p for p in task.train}
    verifier = task.verifier
    assert verifier is not None, f"{cfg.task.kind}: a task with a verifier is needed for GRPO's reward"
    system = cfg.tokenizer.system_prompt
    rows = [
        {
            "prompt": ([{"role": "system", "content": system}] if system else [])
            + [{"role": "user", "content": p.text}],
            "prompt_id": p.prompt_id,
        }
        for p in task.train
    ]

    def reward(prompts: list[Any], completions: list[Any], prompt_id: list[str], **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        verdicts = [verifier(by_id[pid], text) for pid, text in zip(prompt_id, texts, strict=True)]
        return [float(v.reward or 0.0) for v in verdicts]

    class StepClock(TrainerCallback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.ends: list[float] = []

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if self.start is None:
                self.start = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            assert self.start is not None
            self.ends.append(time.perf_counter() - self.start)

    g = job["group"]
    args = GRPOConfig(
        output_dir=str(Path(job["out"]) / "trainer"),
        use_cpu=True,
        bf16=job["bf16"],
        learning_rate=job["lr"],  # paceflow's optimizer settings: constant AdamW lr, its weight decay and clip
        lr_scheduler_type="constant",
        weight_decay=job["weight_decay"],
        max_grad_norm=job["grad_clip"],
        per_device_train_batch_size=job["prompts_per_step"] * g,
        gradient_accumulation_steps=1,
        num_generations=g,
        max_completion_length=job["max_new_tokens"],
        temperature=job["temperature"],
        top_p=1.0,
        top_k=0,
        beta=0.0,  # no reference model: paceflow's GRPO runs without a KL term too
        num_iterations=1,
        max_steps=job["steps"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=job["seed"],
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    clock = StepClock()
    trainer = GRPOTrainer(
        model=str(resolve_model_dir(cfg.model)),
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_list(rows),
        callbacks=[clock],
    )
    trainer.train()
    out = Path(job["out"])
    trainer.save_model(str(out / "final"))
    trainer.processing_class.save_pretrained(str(out / "final"))
    logs = [{k: v for k, v in e.items() if isinstance(v, (int, float))} for e in trainer.state.log_history]
    (out / "trl.json").write_text(json.dumps({"step_ends_s": clock.ends, "log": logs}, indent=1))


if __name__ == "__main__":
    main()
