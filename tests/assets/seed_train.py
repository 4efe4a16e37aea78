"""A training script in the seed's shape, the tests' own (issue 13): it knows nothing of orchestrate.

``TrlParser((ScriptArguments, SFTConfig))`` reads ``--config``; the model is ``model_name`` (the
seed's name); a custom chat template renders each conversation into a text field of the script's
choosing; ``SFTTrainer`` trains; ``train(resume_from_checkpoint=training_args.resume_from_checkpoint)``
as the seed does; then the final model is saved.
"""
from dataclasses import dataclass, field

from datasets import load_dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import SFTConfig, SFTTrainer, TrlParser

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@dataclass
class ScriptArguments:
    model_name: str = field(default=None, metadata={"help": "model folder"})
    dataset_path: str = field(default=None, metadata={"help": "folder with train_dataset.json"})
    text_field: str = field(default="rendered", metadata={"help": "column the chat template renders into"})


def main():
    script_args, training_args = TrlParser((ScriptArguments, SFTConfig)).parse_args_and_config()
    set_seed(training_args.seed)
    tokenizer = AutoTokenizer.from_pretrained(script_args.model_name)
    tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    ds = load_dataset("json", data_files=f"{script_args.dataset_path}/train_dataset.json", split="train")
    ds = ds.map(lambda row: {script_args.text_field: tokenizer.apply_chat_template(row["messages"], tokenize=False)},
                remove_columns=ds.column_names)
    training_args.dataset_text_field = script_args.text_field
    model = AutoModelForCausalLM.from_pretrained(script_args.model_name)
    trainer = SFTTrainer(model=model, args=training_args, train_dataset=ds, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()


if __name__ == "__main__":
    main()
