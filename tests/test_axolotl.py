"""axolotl configs run as they are (issue 11, first part): real example configs from axolotl's examples/
(tests/axolotl_configs, unchanged; only the model and data paths pointed at local files here) are translated into
this trainer's flags, every mapped key takes effect, keys we do not implement and unknown keys stop the run naming
them, and one config trains end to end."""

from __future__ import annotations

import json
import os

import pytest
import yaml
from conftest import ROOT, run, train_py, write_jsonl

import train

CONFIGS = os.path.join(ROOT, "tests", "axolotl_configs")


def alpaca_rows(n: int) -> list[dict]:
    return [{"instruction": f"Say the number {i}.", "input": "", "output": f"The number is {i}."} for i in range(n)]


def localized(tmp_path, name: str, model: str, data: str, **changes) -> str:
    """The example config with base_model, dataset paths and output_dir pointed at local ones (and `changes`)."""
    with open(os.path.join(CONFIGS, f"{name}.yml"), encoding="utf-8") as handle:
        config = yaml.safe_load(handle)
    config.update(base_model=model, output_dir=str(tmp_path / "out"))
    for entry in config["datasets"]:
        entry["path"] = data
    config.update(changes)
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


@pytest.fixture
def alpaca_file(tmp_path):
    return write_jsonl(tmp_path / "alpaca.jsonl", alpaca_rows(16))


def test_axolotls_qlora_example_maps_every_key_onto_our_flags(tmp_path, alpaca_file):
    config = localized(tmp_path, "qlora-1b", "some/model", alpaca_file, dataset_exact_deduplication=True)
    model_args, data_args, args, _ = train.parse_arguments([config])
    assert model_args.model_name_or_path == "some/model" and model_args.pad_token == "<|end_of_text|>"
    assert (args.bits, args.quant_type, args.double_quant, args.full_finetune) == (4, "nf4", True, False)
    assert args.lora_modules == "gate_proj,down_proj,up_proj,q_proj,v_proj,k_proj,o_proj"
    assert (args.lora_r, args.lora_alpha, args.lora_dropout) == (32, 16, 0.05)
    assert data_args.dataset == [alpaca_file] and data_args.dataset_format == ["alpaca"]
    assert (data_args.model_max_len, data_args.sample_packing, data_args.eval_sample_packing) == (2048, True, True)
    assert data_args.pad_to_multiple_of == 2048 and data_args.eval_dataset_size == 0.1  # pad_to_sequence_len
    assert data_args.dataset_prepared_path == "last_run_prepared" and data_args.dataset_exact_deduplication
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_train_epochs) == (2, 4, 1)
    assert str(args.optim.value) == "adamw_bnb_8bit" and str(args.lr_scheduler_type.value) == "cosine"
    assert (args.learning_rate, args.warmup_steps, args.weight_decay, args.logging_steps) == (0.0002, 10, 0.0, 1)
    assert args.eval_steps == 0.25 and str(args.eval_strategy.value) == "steps"  # evals_per_epoch 4 of 1 epoch
    assert args.save_steps == 1.0 and str(args.save_strategy.value) == "steps"  # saves_per_epoch 1
    assert (args.loss_watchdog_threshold, args.loss_watchdog_patience) == (5.0, 3)
    assert args.activation_checkpointing and not args.tf32 and not args.bf16  # bf16: auto, and no bf16 GPU here
    assert model_args.attn_implementation == "flash_attention_2"  # flash_attention: true (sdpa when loaded on CPU)


def test_axolotls_chat_template_example_needs_a_template_we_have_and_maps_the_rest(tmp_path):
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": [{"role": "user", "content": "Hi"},
                                                               {"role": "assistant", "content": "Hello"}]}])
    with pytest.raises(train.UsageError, match=r"chat_template: llama3 \(a named template; use tokenizer_default"):
        train.parse_arguments([localized(tmp_path, "instruct-lora-8b", "m", data)])
    config = localized(tmp_path, "instruct-lora-8b", "m", data, chat_template="tokenizer_default")
    _, data_args, args, _ = train.parse_arguments([config, "--learning_rate", "1e-5"])  # the command line wins
    assert data_args.dataset_format == ["chat_template"] and (args.bits, args.lora_modules) == (8, "all")
    assert args.learning_rate == 1e-5 and args.eval_steps == 1 / 16  # evals_per_epoch 4 over num_epochs 4
    chatml = localized(tmp_path, "instruct-lora-8b", "m", data, chat_template="chatml")
    assert train.parse_arguments([chatml])[1].dataset_format == ["chatml"]


def test_keys_we_do_not_implement_stop_the_run_naming_every_one_and_unknown_keys_name_the_closest(tmp_path, alpaca_file):
    config = localized(tmp_path, "qlora-1b", "m", alpaca_file, chat_template="llama3",
                       datasets=[{"path": alpaca_file, "type": "chat_template", "roles": {"user": ["human", "asker"]},
                                  "message_property_mappings": {"role": "speaker"}}])
    with pytest.raises(train.UsageError) as error:
        train.parse_arguments([config])
    for key in ("chat_template: llama3 (a named template", "datasets[0].message_property_mappings",
                "datasets[0].roles.user"):
        assert key in str(error.value)
    result = run(train_py(config), cwd=str(tmp_path))  # as a user sees it: exit 2, before anything is written
    assert result.returncode == 2 and "roles.user" in result.output and "Traceback" not in result.output
    assert not os.path.exists(tmp_path / "out")
    typo = localized(tmp_path, "qlora-1b", "m", alpaca_file, micro_batch_sise=4)
    with pytest.raises(train.UsageError, match=r"unknown key micro_batch_sise \(did you mean micro_batch_size\?\)"):
        train.parse_arguments([typo])


def test_wandb_keys_go_to_the_environment_and_turn_on_wandb_reporting(tmp_path, alpaca_file, monkeypatch):
    for name in ("WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.setenv(name, "")  # recorded, so that the test's own settings are undone afterwards
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    config = localized(tmp_path, "qlora-1b", "m", alpaca_file, wandb_project="proj", wandb_entity="team",
                       wandb_name="first-run")
    _, _, args, _ = train.parse_arguments([config])
    assert os.environ["WANDB_PROJECT"] == "proj" and os.environ["WANDB_ENTITY"] == "team"
    assert "wandb" in args.report_to and args.run_name == "first-run"


SECRETS = {"wandb_api_key": "planted-wandb-key-0123456789abcdef", "hf_token": "hf_plantedTokenForTheTest42"}


def test_a_runpod_job_with_axolotls_qlora_example_trains_and_its_credentials_appear_nowhere(tmp_path, tiny_model,
                                                                                            alpaca_file):
    """The RunPod worker's job layout around a real axolotl example; wandb (offline) and tensorboard both report."""
    config = localized(tmp_path, "qlora-1b", tiny_model, alpaca_file, sequence_len=128, max_steps=2,
                       evals_per_epoch=None, saves_per_epoch=None, val_set_size=0, micro_batch_size=2,
                       gradient_accumulation_steps=1, optimizer="adamw_torch", special_tokens=None,
                       dataset_prepared_path=str(tmp_path / "prepared"), wandb_project="runpod-test",
                       report_to=["wandb", "tensorboard"], output_dir=None)
    with open(config) as handle:
        args = yaml.safe_load(handle)
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": {"user_id": "u1", "model_id": "tiny", "run_id": "run-7",
                                         "credentials": SECRETS, "args": args}}))
    result = run(train_py(str(job)), cwd=str(tmp_path), WANDB_DIR="")
    assert result.returncode == 0, result.output[-3000:]
    assert "axolotl adapter: qlora -> --bits 4" in result.output
    assert "credentials set in the environment: WANDB_API_KEY, HF_TOKEN" in result.output
    final = tmp_path / "outputs" / "run-7"  # the job's run_id names the output dir and the run
    with open(final / "adapter_config.json") as handle:
        adapter = json.load(handle)
    assert sorted(adapter["target_modules"]) == sorted(["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj",
                                                         "k_proj", "o_proj"])
    assert adapter["r"] == 32 and adapter["lora_alpha"] == 16
    with open(tmp_path / "prepared" / "stats.json") as handle:
        assert json.load(handle)["model_max_len"] == 128
    assert not (tmp_path / "wandb").exists() and list(final.glob("wandb/offline-run-*"))  # under the run's dir
    assert list(final.glob("runs/*/events.out.tfevents.*"))  # tensorboard's events
    for secret in SECRETS.values():
        assert secret not in result.output
        for path in tmp_path.rglob("*"):
            if path.is_file() and path != job:
                assert secret.encode() not in path.read_bytes(), path


def test_print_config_shows_the_translation_as_a_recipe_that_reads_back_the_same(tmp_path, alpaca_file, capsys):
    config = localized(tmp_path, "qlora-1b", "some/model", alpaca_file)
    assert train.main([config, "--print_config", "--lora_r", "8"]) == 0
    printed = capsys.readouterr().out
    settings = {}
    for part in yaml.safe_load_all(printed.replace("\n# ", "\n---\n# ")):
        settings.update(part or {})
    assert settings["model_name_or_path"] == "some/model" and settings["lora_r"] == 8  # the command line wins
    assert settings["lora_modules"] == "gate_proj,down_proj,up_proj,q_proj,v_proj,k_proj,o_proj"
    assert settings["optim"] == "adamw_bnb_8bit" and settings["eval_steps"] == 0.25
    assert "gradient_checkpointing" not in settings and settings["activation_checkpointing"] is True  # current names
    assert "use_cpu" not in settings  # resolved by each machine, not part of the recipe
    assert settings["attn_implementation"] == "flash_attention_2"  # printed on a CPU machine, kept for the GPU one
    recipe = tmp_path / "printed.yaml"
    recipe.write_text(printed)
    assert train.main([str(recipe), "--print_config"]) == 0
    assert capsys.readouterr().out == printed


def test_a_runpod_job_file_is_checked_like_a_config(tmp_path, alpaca_file, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "from-the-environment")
    args = yaml.safe_load(open(localized(tmp_path, "qlora-1b", "m", alpaca_file)))
    job = tmp_path / "job.json"
    job.write_text(json.dumps({"input": {"run_id": "r", "credentials": {"hf_token": "", "wandb_key": "x"}, "args": args}}))
    with pytest.raises(train.UsageError, match=r"input.credentials.wandb_key is not one this trainer uses"):
        train.parse_arguments([str(job)])
    job.write_text(json.dumps({"input": {"run_id": "r", "credentials": {"hf_token": ""}, "args": args}}))
    _, _, training, _ = train.parse_arguments([str(job)])
    assert training.run_name == "r" and os.environ["HF_TOKEN"] == "from-the-environment"  # empty counts as absent
    job.write_text(json.dumps({"input": {"run_ID": "r", "args": args}}))
    with pytest.raises(train.UsageError, match=r"unknown key input.run_ID"):
        train.parse_arguments([str(job)])


def test_env_file_fills_what_the_environment_lacks(tmp_path, alpaca_file, monkeypatch):
    from finetune.config import environment

    monkeypatch.setenv("FT_TEST_KEPT", "from-the-environment")
    for name in ("FT_TEST_NEW", "FT_TEST_QUOTED", "FT_TEST_DEFAULT"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    env_file = tmp_path / "secrets.env"
    env_file.write_text("# credentials\nexport FT_TEST_NEW=abc # a comment\nFT_TEST_QUOTED=\"a b#c\"\n"
                        "FT_TEST_KEPT=from-the-file\n")
    environment.load_env_file(str(env_file))
    assert (os.environ["FT_TEST_NEW"], os.environ["FT_TEST_QUOTED"]) == ("abc", "a b#c")
    assert os.environ["FT_TEST_KEPT"] == "from-the-environment"
    env_file.write_text("FT_TEST_NEW=1\nnot a setting\n")
    with pytest.raises(train.UsageError, match=r"secrets.env:2: expected KEY=VALUE"):
        environment.load_env_file(str(env_file))
    monkeypatch.chdir(tmp_path)  # ./.env is read when present, with no flag
    (tmp_path / ".env").write_text("FT_TEST_DEFAULT=yes\n")
    train.parse_arguments(["--model_name_or_path", "m", "--dataset", alpaca_file, "--output_dir", str(tmp_path / "o")])
    assert os.environ["FT_TEST_DEFAULT"] == "yes"


def test_the_readme_mapping_table_is_the_one_the_code_generates():
    from finetune.config import axolotl

    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as handle:
        readme = handle.read()
    block = readme.split("<!-- axolotl-table -->\n", 1)[1].split("\n<!-- /axolotl-table -->", 1)[0]
    assert block == axolotl.mapping_table()
    for key in ("base_model", "lora_model_dir", "micro_batch_size", "sample_packing", "datasets", "val_set_size"):
        assert f"| `{key}` |" in block


def test_unknown_keys_of_a_dataset_entry_name_the_closest(tmp_path, alpaca_file):
    config = localized(tmp_path, "qlora-1b", "m", alpaca_file)
    settings = yaml.safe_load(open(config))
    settings["datasets"][0]["feild_messages"] = "messages"
    (tmp_path / "typo.yml").write_text(yaml.safe_dump(settings))
    with pytest.raises(train.UsageError, match=r"unknown key datasets\[0\].feild_messages \(did you mean field_messages\?\)"):
        train.parse_arguments([str(tmp_path / "typo.yml")])


def test_chat_template_jinja_and_lora_modules_to_save_map_and_take_effect(tmp_path, tiny_model, alpaca_file):
    from conftest import build_stages

    from finetune.modeling.tokenizer import load_tokenizer

    template = open(os.path.join(ROOT, "tests", "templates", "qwen2.5-instruct.jinja"), encoding="utf-8").read()
    config = localized(tmp_path, "instruct-lora-8b", "m", alpaca_file, chat_template="jinja",
                       chat_template_jinja=template, lora_modules_to_save=["embed_tokens", "lm_head"],
                       default_system_message="You are kind.")
    model_args, data_args, args, _ = train.parse_arguments([config])
    assert data_args.default_system_prompt == "You are kind."
    assert model_args.chat_template_jinja == template and data_args.dataset_format == ["chat_template"]
    assert args.lora_modules_to_save == "embed_tokens,lm_head"
    for value in (template, os.path.join(ROOT, "tests", "templates", "qwen2.5-instruct.jinja")):  # text or a file
        model_args.model_name_or_path, model_args.chat_template_jinja = tiny_model, value
        assert load_tokenizer(model_args, data_args).chat_template == template
    model_args.chat_template_jinja = "no-such-template.jinja"
    with pytest.raises(train.UsageError, match=r"--chat_template_jinja no-such-template.jinja: neither a file"):
        load_tokenizer(model_args, data_args)
    built = build_stages(tiny_model, alpaca_file, tmp_path / "o", "--dataset_format", "alpaca", "--bits", "32",
                         "--lora_modules_to_save", "lm_head", "--save_strategy", "no")
    trained = [name for name, p in built.model.named_parameters() if p.requires_grad]
    assert any("lm_head.modules_to_save" in name for name in trained) and any("lora_A" in name for name in trained)
    with pytest.raises(train.UsageError, match=r"--lora_modules_to_save lm_haed: the model has no module of that name \(did you mean lm_head\?\)"):
        build_stages(tiny_model, alpaca_file, tmp_path / "o2", "--dataset_format", "alpaca", "--bits", "32",
                     "--lora_modules_to_save", "lm_haed")


def test_preference_keys_map_onto_rl_and_its_knobs(tmp_path, alpaca_file):
    config = localized(tmp_path, "qlora-1b", "some/model", alpaca_file, rl="dpo", rl_beta=0.05, dpo_label_smoothing=0.1,
                       sample_packing=False, eval_sample_packing=False)
    _, data_args, args, _ = train.parse_arguments([config])
    assert (data_args.rl, args.rl_beta, args.label_smoothing) == ("dpo", 0.05, 0.1)
    config = localized(tmp_path, "qlora-1b", "some/model", alpaca_file, rl="simpo", simpo_gamma=1.0, sample_packing=False,
                       eval_sample_packing=False)
    _, data_args, args, _ = train.parse_arguments([config])
    assert (data_args.rl, args.simpo_gamma) == ("simpo", 1.0)
    config = localized(tmp_path, "qlora-1b", "some/model", alpaca_file, rl="dpo")  # the example packs its samples
    with pytest.raises(train.UsageError, match="--rl dpo compares each pair's two answers .* so --sample_packing"):
        train.parse_arguments([config])


def test_tokens_become_whole_trainable_vocabulary_entries(tmp_path, tiny_model, alpaca_file):
    from conftest import build_stages

    config = localized(tmp_path, "qlora-1b", "m", alpaca_file, tokens=["<tool>", "</tool>"])
    model_args, _, _, _ = train.parse_arguments([config])
    assert model_args.add_tokens == ["<tool>", "</tool>"]
    built = build_stages(tiny_model, alpaca_file, tmp_path / "o", "--dataset_format", "alpaca", "--bits", "32",
                         "--add_tokens", "<tool>", "</tool>", "--save_strategy", "no")
    ids = built.tokenizer("<tool>x</tool>", add_special_tokens=False)["input_ids"]
    assert ids[0] == built.tokenizer.convert_tokens_to_ids("<tool>") and len(ids) <= 3
    assert "<tool>" not in built.tokenizer.all_special_tokens  # an ordinary token: decoded, never skipped
    assert built.model.get_input_embeddings().weight.shape[0] == len(built.tokenizer)
    assert any("embed_tokens" in name for name, p in built.model.named_parameters() if p.requires_grad)


# every renamed or same-named axolotl key: (value in the config, extra keys its checks need, expected parsed value)
KEY_VALUES = {
    "adam_beta1": (0.8, {}, 0.8), "adam_beta2": (0.99, {}, 0.99), "adam_epsilon": (1e-6, {}, 1e-6),
    "chat_template_jinja": ("{{ messages }}", {}, "{{ messages }}"),
    "dataset_exact_deduplication": (True, {}, True), "dataset_prepared_path": ("prep", {}, "prep"),
    "dataset_processes": (3, {}, 3), "deepspeed": ("{deepspeed}", {}, "{deepspeed}"),
    "early_stopping_patience": (2, {"val_set_size": 0.1, "eval_steps": 5}, 2),
    "eval_sample_packing": (False, {"sample_packing": True}, False), "eval_steps": (7, {"val_set_size": 0.1}, 7),
    "fp16": (True, {}, True), "fsdp": (["full_shard", "auto_wrap"], {}, "full_shard auto_wrap"),
    "fsdp_config": ({"fsdp_offload_params": True}, {"fsdp": ["full_shard"]}, None),
    "gradient_accumulation_steps": (3, {}, 3), "group_by_length": (True, {}, "group_by_length"),
    "hub_model_id": ("me/model", {}, "me/model"), "learning_rate": (3e-4, {}, 3e-4), "logging_steps": (5, {}, 5),
    "lora_alpha": (32, {}, 32), "lora_dropout": (0.1, {}, 0.1), "lora_model_dir": ("{adapter}", {}, "{adapter}"),
    "lora_r": (4, {}, 4), "loraplus_lr_ratio": (16.0, {}, 16.0), "loss_watchdog_patience": (5, {}, 5),
    "loss_watchdog_threshold": (9.0, {}, 9.0), "max_grad_norm": (0.5, {}, 0.5), "max_steps": (11, {}, 11),
    "neftune_noise_alpha": (5.0, {}, 5.0), "output_dir": ("{out}", {}, "{out}"),
    "resume_from_checkpoint": ("{checkpoint}", {}, "{checkpoint}"), "rl": ("dpo", {}, "dpo"),
    "rl_beta": (0.2, {"rl": "dpo"}, 0.2), "sample_packing": (True, {}, True), "save_steps": (9, {}, 9),
    "save_total_limit": (2, {}, 2), "seed": (5, {}, 5), "simpo_gamma": (0.7, {"rl": "simpo"}, 0.7),
    "tf32": (False, {}, False), "torch_compile": (True, {}, True), "warmup_ratio": (0.1, {}, 0.1),
    "warmup_steps": (4, {}, 4), "weight_decay": (0.01, {}, 0.01),
    "base_model": ("{model}", {}, "{model}"), "default_system_message": ("Be brief.", {"datasets": "chat"}, "Be brief."),
    "dpo_label_smoothing": (0.1, {"rl": "dpo"}, 0.1), "eval_batch_size": (3, {}, 3),
    "gradient_checkpointing": (True, {}, True), "kto_desirable_weight": (1.5, {"rl": "kto"}, 1.5),
    "kto_undesirable_weight": (0.5, {"rl": "kto"}, 0.5), "lora_modules_to_save": (["lm_head"], {}, "lm_head"),
    "lora_target_modules": (["q_proj", "v_proj"], {}, "q_proj,v_proj"), "lr_scheduler": ("linear", {}, "linear"),
    "micro_batch_size": (3, {}, 3), "num_epochs": (2, {}, 2), "optimizer": ("adamw_torch", {}, "adamw_torch"),
    "orpo_alpha": (0.3, {"rl": "orpo"}, 0.3), "peft_use_dora": (True, {}, True), "peft_use_rslora": (True, {}, True),
    "sequence_len": (333, {}, 333), "tokenizer_config": ("{model}", {}, "{model}"), "tokens": (["<x>"], {}, ["<x>"]),
    "train_on_inputs": (True, {}, True), "val_set_size": (0.2, {}, 0.2), "wandb_name": ("run-7", {}, "run-7"),
}


def test_every_renamed_key_reaches_its_flag_with_its_value(tmp_path, tiny_model, alpaca_file):
    """The flags themselves have their own take-effect tests; this one proves each axolotl key sets its flag."""
    from finetune.config import axolotl
    from finetune.config.flags import LEGACY_FLAGS

    assert set(KEY_VALUES) == set(axolotl.RENAMED) | axolotl.SAME  # a key added to the tables needs a row here
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3}')
    places = {"deepspeed": os.path.join(ROOT, "configs", "deepspeed-zero3.json"), "adapter": str(adapter),
              "out": str(tmp_path / "elsewhere"), "checkpoint": str(checkpoint), "model": tiny_model}
    def fill(value):  # "{model}" -> the tiny model's path, ...
        return places[value[1:-1]] if isinstance(value, str) and value[1:-1] in places and value[0] == "{" else value

    for key, (value, extra, expected) in KEY_VALUES.items():
        flag = axolotl.RENAMED.get(key, key)
        config = {"base_model": tiny_model, "output_dir": str(tmp_path / "out"), "adapter": "lora",
                  "datasets": [{"path": alpaca_file, "type": "alpaca"}], **extra, key: fill(value)}
        if extra.get("datasets") == "chat":  # a conversation format
            config["datasets"] = [{"path": alpaca_file, "type": "chat_template"}]
        translated = axolotl.translate("c.yml", config, set())
        expected = fill(expected)
        if key == "fsdp_config":  # needs GPUs to pass the checks; translated as it is
            assert translated["fsdp_config"] == value
            continue
        assert flag in translated, key
        path = tmp_path / "c.yml"
        path.write_text(yaml.safe_dump(config))
        try:
            parsed = train.parse_arguments([str(path)])
        except train.UsageError as error:  # checks that need hardware or the hub (fp16 on CPU, fsdp, hub probe)
            assert key in ("fp16", "fsdp", "hub_model_id", "torch_compile"), f"{key}: {error}"
            assert translated[flag] == value
            continue
        flag = LEGACY_FLAGS.get(f"--{flag}", (f"--{flag}",))[0].lstrip("-")  # a legacy name, mapped by recipes.py
        holders = [group for group in parsed if hasattr(group, flag)]
        assert holders, (key, flag)
        got = getattr(holders[0], flag)
        got = getattr(got, "value", got)
        if isinstance(got, list) and not isinstance(expected, list):
            got = " ".join(str(getattr(item, "value", item)) for item in got)
        assert got == expected, (key, got, expected)


def test_keys_read_by_other_translations_take_effect(tmp_path, tiny_model, alpaca_file, monkeypatch):
    """The CONSUMED keys not covered by the example configs: each one's effect on the parsed arguments."""
    for name in ("WANDB_RUN_ID", "WANDB_WATCH", "WANDB_LOG_MODEL"):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("WANDB_MODE", "offline")
    base = {"base_model": tiny_model, "output_dir": str(tmp_path / "out"), "adapter": "lora",
            "datasets": [{"path": alpaca_file, "type": "alpaca"}]}

    def parse(**keys):
        path = tmp_path / "c.yml"
        path.write_text(yaml.safe_dump({**base, **keys}))
        return train.parse_arguments([str(path)])

    model_args, data_args, args, _ = parse(
        sdp_attention=True, cosine_min_lr_ratio=0.1, load_in_8bit=True, lora_target_linear=True,
        overrides_of_model_config={"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
        wandb_run_id="abc123", wandb_watch="gradients", wandb_log_model="end", shuffle_merged_datasets=True)
    assert model_args.attn_implementation == "sdpa" and (args.bits, args.lora_modules) == (8, "all")
    assert str(args.lr_scheduler_type.value) == "cosine_with_min_lr" and args.lr_scheduler_kwargs == {"min_lr_rate": 0.1}
    assert (model_args.rope_scaling_type, model_args.rope_scaling_factor) == ("linear", 2.0)
    assert (os.environ["WANDB_RUN_ID"], os.environ["WANDB_WATCH"], os.environ["WANDB_LOG_MODEL"]) == (
        "abc123", "gradients", "end") and "wandb" in args.report_to
    with pytest.raises(train.UsageError, match="shuffle_merged_datasets: false"):
        parse(shuffle_merged_datasets=False)
