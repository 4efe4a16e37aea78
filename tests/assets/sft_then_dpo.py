"""A two-stage training script, the tests' own (issue 18.2): it knows nothing of orchestrate.

As users write it: the seed's ``TrlParser((ScriptArguments, SFTConfig))`` reads ``--config``; an
evaluation-only ``Trainer`` first scores the base model (it never trains); ``SFTTrainer`` trains and
the SFT model is saved as full weights; then ``DPOTrainer`` goes on from that model with a small
preference data set made from the same chats (chosen: the real answer; rejected: the answer of
another row) and saves its own model. Both trainers write into the same ``output_dir``. Every Trainer of
the process uses the same mixed precision (accelerate's state is one per process).
"""
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed
from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer, TrlParser


@dataclass
class ScriptArguments:
    model_name: str = field(default=None, metadata={"help": "model folder"})
    dataset_path: str = field(default=None, metadata={"help": "folder with train_dataset.json"})
    dpo_max_steps: int = field(default=8, metadata={"help": "DPO steps"})
    dpo_rows: int = field(default=64, metadata={"help": "preference pairs"})


def full_weights(trainer):
    """Under FSDP, save_model writes shards unless asked for the full state dict (what from_pretrained reads)."""
    if trainer.is_fsdp_enabled:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    trainer.save_model()
    trainer.accelerator.wait_for_everyone()   # rank 0 writes the folder; every rank reads it next


def preference_pairs(chats, n):
    rows = []
    for i in range(n):
        msgs, other = chats[i]["messages"], chats[(i + 7) % len(chats)]["messages"]
        rows.append({"prompt": msgs[:-1], "chosen": [msgs[-1]], "rejected": [other[-1]]})
    return rows


def main():
    script_args, training_args = TrlParser((ScriptArguments, SFTConfig)).parse_args_and_config()
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    chats = load_dataset("json", data_files=f"{script_args.dataset_path}/train_dataset.json", split="train")
    held_out = load_dataset("json", data_files=f"{script_args.dataset_path}/test_dataset.json", split="train")

    # Score the base model first: a Trainer that only evaluates.
    base = AutoModelForCausalLM.from_pretrained(script_args.model_name)
    texts = held_out.map(lambda r: tokenizer.apply_chat_template(r["messages"], tokenize=True, return_dict=True),
                         remove_columns=held_out.column_names)
    texts = texts.map(lambda r: {"labels": r["input_ids"]})
    scorer = Trainer(model=base, args=TrainingArguments(output_dir=f"{training_args.output_dir}/base-eval",
                                                        per_device_eval_batch_size=1, report_to="none",
                                                        use_cpu=training_args.use_cpu, bf16=training_args.bf16),
                     eval_dataset=texts.select(range(4)))
    print("base model:", scorer.evaluate())

    model = AutoModelForCausalLM.from_pretrained(script_args.model_name)
    sft = SFTTrainer(model=model, args=training_args, train_dataset=chats, processing_class=tokenizer)
    sft.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    full_weights(sft)

    pairs = chats.from_list(preference_pairs(chats, script_args.dpo_rows))
    dpo_args = DPOConfig(
        output_dir=training_args.output_dir, max_steps=script_args.dpo_max_steps, save_steps=training_args.save_steps,
        logging_steps=1, per_device_train_batch_size=training_args.per_device_train_batch_size,
        learning_rate=training_args.learning_rate, max_length=training_args.max_length, report_to="none",
        seed=training_args.seed, use_cpu=training_args.use_cpu, bf16=training_args.bf16, fsdp=training_args.fsdp,
        fsdp_config=training_args.fsdp_config, gradient_checkpointing=False)
    policy = AutoModelForCausalLM.from_pretrained(training_args.output_dir)
    dpo = DPOTrainer(model=policy, args=dpo_args, train_dataset=pairs, processing_class=tokenizer)
    dpo.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    full_weights(dpo)


if __name__ == "__main__":
    main()
