"""Pruned models with different widths per block save and reload with plain transformers calls.

Each family is shrunk by hand the way the structured pruner does it: block 0 loses one query head
per KV group (q rows, o columns, `num_key_value_groups`) and gains an o_proj bias, the last block
loses MLP channels, and the middle block is deleted (config and `layer_idx` updated).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import metricgp
from metricgp.models import block_linears, find_blocks
from metricgp.structured.saving import load_pruned, save_pruned

FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gemma3")
PER_LAYER = {0: {"num_attention_heads": 2}, 1: {"intermediate_size": 40}}
ROOT = Path(__file__).resolve().parents[1]


def family_model(family: str) -> nn.Module:
    """3 blocks, hidden 32, 4 heads of 8 in 2 KV groups; Gemma3 mixes sliding and full attention."""
    import transformers

    torch.manual_seed(0)
    common = dict(vocab_size=300, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    if family == "gemma3":
        config = transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=4,
                                               layer_types=["sliding_attention"] * 2 + ["full_attention"])
        return transformers.Gemma3ForCausalLM(config).eval()
    cls = {"llama": "LlamaConfig", "qwen2": "Qwen2Config", "mistral": "MistralConfig", "gemma": "GemmaConfig"}
    extra = {"head_dim": 8} if family == "gemma" else {}
    config = getattr(transformers, cls[family])(**common, **extra)
    return transformers.AutoModelForCausalLM.from_config(config).eval()


def sliced(lin: nn.Linear, rows=None, cols=None, add_bias: bool = False) -> nn.Linear:
    """A smaller copy of `lin` keeping `rows` (outputs) and `cols` (inputs); optionally a new bias."""
    w = lin.weight.detach()
    w = w if rows is None else w[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None or add_bias)
    with torch.no_grad():
        new.weight.copy_(w)
        if lin.bias is not None:
            new.bias.copy_(lin.bias if rows is None else lin.bias[rows])
        elif add_bias:
            new.bias.normal_()
    return new


def drop_query_heads(attn: nn.Module, per_group: int = 1) -> None:
    """Remove the last `per_group` query heads of every KV group; keys and values stay."""
    d, groups = attn.head_dim, attn.num_key_value_groups
    n_kv = attn.k_proj.out_features // d
    heads = [g * groups + j for g in range(n_kv) for j in range(groups - per_group)]
    rows = torch.tensor([h * d + i for h in heads for i in range(d)])
    attn.q_proj = sliced(attn.q_proj, rows=rows)
    attn.o_proj = sliced(attn.o_proj, cols=rows, add_bias=True)  # bias compensation adds one
    attn.num_key_value_groups = groups - per_group


def drop_channels(mlp: nn.Module, keep: int) -> None:
    idx = torch.arange(keep)
    mlp.gate_proj, mlp.up_proj = sliced(mlp.gate_proj, rows=idx), sliced(mlp.up_proj, rows=idx)
    mlp.down_proj = sliced(mlp.down_proj, cols=idx)


def delete_block(model: nn.Module, index: int) -> None:
    prefix, blocks = find_blocks(model)
    kept = [b for i, b in enumerate(blocks) if i != index]
    model.get_submodule(prefix.rpartition(".")[0]).layers = nn.ModuleList(kept)
    for new_idx, block in enumerate(kept):
        for sub in block.modules():
            if isinstance(getattr(sub, "layer_idx", None), int):
                sub.layer_idx = new_idx
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [t for i, t in enumerate(model.config.layer_types) if i != index]


def pruned_model(family: str) -> nn.Module:
    model = family_model(family)
    blocks = find_blocks(model)[1]
    drop_query_heads(blocks[0].self_attn)
    drop_channels(blocks[2].mlp, keep=40)
    delete_block(model, 1)
    return model.eval()


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def greedy(model: nn.Module, ids: torch.Tensor, cache: bool = True) -> torch.Tensor:
    return model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=cache, pad_token_id=0)


def lora_names(model: nn.Module) -> list[str]:
    """The leaf names of every linear inside a block: what a user would target with LoRA."""
    return sorted({name.rpartition(".")[2] for name in block_linears(find_blocks(model)[1][0])})


IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11, 64, 8]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[nn.Module, Path]]:
    """Every family pruned in memory and saved once, with its expected logits beside it."""
    from conftest import train_tokenizer

    tokenizer = train_tokenizer("the cat sat on the mat and the dog ran to the house\n" * 20)
    out = {}
    for family in FAMILIES:
        model, path = pruned_model(family), tmp_path_factory.mktemp(family)
        save_pruned(model, path, tokenizer=tokenizer, per_layer=PER_LAYER)
        torch.save({"ids": IDS, "logits": logits(model, IDS)}, path / "expected.pt")
        out[family] = (model, path)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_reload_gives_identical_logits_and_generation(saved, family):
    model, path = saved[family]
    dense_cls = type(family_model(family))
    loaded = load_pruned(path)
    assert isinstance(loaded, dense_cls) and type(loaded).__name__ == dense_cls.__name__
    assert not loaded.training
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    assert n_params(loaded) == n_params(model) < n_params(family_model(family))
    assert torch.equal(greedy(loaded, IDS), greedy(model, IDS))
    assert torch.equal(greedy(loaded, IDS), greedy(loaded, IDS, cache=False))
    if family == "gemma3":
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_on_disk_config_uses_the_standard_per_layer_field(saved):
    from transformers import AutoConfig, AutoTokenizer

    path = saved["llama"][1]
    raw = json.loads((path / "config.json").read_text())
    assert raw["model_type"] == "metricgp_pruned" and raw["base_model_type"] == "llama"
    assert raw["num_hidden_layers"] == 2 and raw["intermediate_size"] == 48  # globals stay dense
    assert raw["pruned_blocks"]["0"]["linears"]["self_attn.o_proj"] == {"out_features": 32, "in_features": 16,
                                                                         "bias": True}
    assert raw["pruned_blocks"]["0"]["ints"] == {"self_attn.num_key_value_groups": 1}
    config = AutoConfig.from_pretrained(path)
    assert config.per_layer_config[0].num_attention_heads == 2
    assert config.per_layer_config[1].intermediate_size == 40
    assert AutoTokenizer.from_pretrained(path)("the cat").input_ids


def test_layer_types_follow_deleted_blocks(saved):
    loaded = load_pruned(saved["gemma3"][1])
    assert loaded.config.layer_types == ["sliding_attention", "full_attention"]
    assert [b.self_attn.layer_idx for b in loaded.model.layers] == [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_rebuilt_base_config_equals_the_pruned_models_config(family):
    from metricgp.structured.saving import PrunedConfig, pruned_config

    model = pruned_model(family)
    model.config.rms_norm_eps = 1e-3  # not a default: must survive the round trip
    model.config.tie_word_embeddings = not model.config.tie_word_embeddings
    written = PrunedConfig.from_dict(pruned_config(model, PER_LAYER).to_dict())
    expected = model.config.to_dict() | {"dtype": "float32", "architectures": None}
    assert written.base_config().to_dict() == expected


def test_saved_reloaded_model_saves_the_pruned_format_again(saved, tmp_path):
    model, path = saved["qwen2"]
    load_pruned(path).save_pretrained(tmp_path, max_shard_size="50KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    again = load_pruned(tmp_path, dtype="auto")
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "metricgp_pruned"
    assert torch.equal(logits(again, IDS), logits(model, IDS))
    assert again._pruned_per_layer == PER_LAYER


def test_dtype_choices(saved, tmp_path):
    loaded = load_pruned(saved["llama"][1], dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    loaded.save_pretrained(tmp_path)
    assert load_pruned(tmp_path, dtype="auto").dtype == torch.bfloat16
    assert load_pruned(tmp_path).dtype == torch.float32


CHILD = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForCausalLM
    paths = sys.argv[1:]
    try:
        AutoModelForCausalLM.from_pretrained(paths[0])
        refused = ""
    except Exception as err:
        refused = str(err)
    import metricgp  # registers the pruned model type; no trust_remote_code anywhere
    same = {}
    for path in paths:
        model = AutoModelForCausalLM.from_pretrained(path)
        expected = torch.load(path + "/expected.pt")
        with torch.no_grad():
            same[path] = torch.equal(model(expected["ids"]).logits, expected["logits"])
    print(json.dumps({"refused": refused, "same": same, "class": type(model).__mro__[1].__name__}))
""")


def test_auto_class_loads_in_a_fresh_process_after_import_metricgp(saved):
    paths = [str(path) for _, path in saved.values()]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", CHILD, *paths], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert "metricgp_pruned" in result["refused"]
    assert result["same"] == dict.fromkeys(paths, True)
    assert result["class"] == "Gemma3ForCausalLM"


def test_package_exports_load_pruned():
    assert metricgp.load_pruned is load_pruned


def test_auto_class_options_and_from_config(saved):
    from transformers import AutoConfig, AutoModelForCausalLM

    model, path = saved["gemma"]
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, attn_implementation="eager",
                                                  device_map="cpu")
    assert loaded.dtype == torch.bfloat16 and loaded.config._attn_implementation == "eager"
    fresh = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    assert n_params(fresh) == n_params(model) and torch.isfinite(logits(fresh, IDS)).all()
    with pytest.raises(TypeError, match="quantization_config"):
        AutoModelForCausalLM.from_pretrained(path, quantization_config={"load_in_8bit": True})


def test_a_same_shape_checkpoint_loads_as_stock_transformers_does(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    mine = load_pruned(tiny_llama_dir)
    stock = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    assert type(mine) is type(stock) and not mine.training
    ids = torch.randint(0, stock.config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(mine, ids), logits(stock, ids))


# These two call peft's `get_peft_model` as a user would; peft 0.21's wrapper itself reads transformers'
# deprecated `is_gradient_checkpointing` (not metricgp's code, which uses the tuner directly).
PEFT_WRAPPER_WARNING = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning")


@pytest.mark.parametrize("family", FAMILIES)
@PEFT_WRAPPER_WARNING
def test_backward_and_lora_merge_survive_save_and_reload(saved, family, tmp_path):
    from peft import LoraConfig, get_peft_model

    loaded = load_pruned(saved[family][1]).train()
    loaded(IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in loaded.parameters())
    loaded.zero_grad()

    peft = get_peft_model(loaded, LoraConfig(r=4, target_modules=lora_names(loaded), lora_dropout=0.0))
    before = logits(peft, IDS)
    opt = torch.optim.Adam([p for p in peft.parameters() if p.requires_grad], lr=1e-2)
    peft(IDS, labels=IDS).loss.backward()
    opt.step()
    merged = peft.merge_and_unload().eval()
    after = logits(merged, IDS)
    assert not torch.equal(after, before)
    merged.save_pretrained(tmp_path / "merged")
    assert torch.equal(logits(load_pruned(tmp_path / "merged"), IDS), after)


@PEFT_WRAPPER_WARNING
def test_lora_on_the_in_memory_pruned_model_then_save_pruned(tmp_path):
    from peft import LoraConfig, get_peft_model

    model = pruned_model("llama")
    peft = get_peft_model(model, LoraConfig(r=4, target_modules=lora_names(model), init_lora_weights=False))
    merged = peft.merge_and_unload().eval()
    save_pruned(merged, tmp_path, per_layer=PER_LAYER)
    assert torch.equal(logits(load_pruned(tmp_path), IDS), logits(merged, IDS))


def test_trainer_one_step_then_save_model_reloads(saved, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load_pruned(saved["gemma3"][1])
    data = [{"input_ids": IDS[0], "labels": IDS[0]}] * 2
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=1,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    model.eval()
    assert not torch.equal(logits(model, IDS), torch.load(saved["gemma3"][1] / "expected.pt")["logits"])
    assert torch.equal(logits(load_pruned(tmp_path / "final"), IDS), logits(model, IDS))


def toy_classes():
    """A causal LM with made-up module names, registered with the Auto classes like any HF model."""
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig, PreTrainedModel
    from transformers.modeling_outputs import CausalLMOutput

    class MetricGPToyConfig(PreTrainedConfig):
        model_type = "metricgp_toy"
        vocab_size: int = 300
        hidden_size: int = 16
        num_hidden_layers: int = 2

    class Churn(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.fan = 4  # a made-up int attribute the pruner keeps in step with the widths
            self.spread = nn.Linear(width, 4 * width)
            self.squeeze = nn.Linear(4 * width, width, bias=False)

        def forward(self, x):
            return self.squeeze(torch.tanh(self.spread(x)))

    class Stage(nn.Module):
        def __init__(self, width: int):
            super().__init__()
            self.churn = Churn(width)

        def forward(self, x):
            return x + self.churn(x)

    class MetricGPToyLM(PreTrainedModel):
        config_class = MetricGPToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.lookup = nn.Embedding(config.vocab_size, config.hidden_size)
            self.stages = nn.ModuleList(Stage(config.hidden_size) for _ in range(config.num_hidden_layers))
            self.readout = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
            self.post_init()

        def forward(self, input_ids, labels=None, **kwargs):
            h = self.lookup(input_ids)
            for stage in self.stages:
                h = stage(h)
            return CausalLMOutput(logits=self.readout(h))

    AutoConfig.register("metricgp_toy", MetricGPToyConfig, exist_ok=True)
    AutoModelForCausalLM.register(MetricGPToyConfig, MetricGPToyLM, exist_ok=True)
    return MetricGPToyConfig, MetricGPToyLM


def test_made_up_module_names_are_recorded_generically(tmp_path):
    config_cls, model_cls = toy_classes()
    torch.manual_seed(0)
    model = model_cls(config_cls()).eval()
    churn = model.stages[1].churn
    keep = torch.arange(40)
    churn.spread, churn.squeeze, churn.fan = sliced(churn.spread, rows=keep), sliced(churn.squeeze, cols=keep), 3
    save_pruned(model, tmp_path)
    record = json.loads((tmp_path / "config.json").read_text())["pruned_blocks"]
    assert record == {"1": {"linears": {"churn.spread": {"out_features": 40, "in_features": 16, "bias": True},
                                        "churn.squeeze": {"out_features": 16, "in_features": 40, "bias": False}},
                            "ints": {"churn.fan": 3}}}
    loaded = load_pruned(tmp_path)
    assert isinstance(loaded, model_cls) and loaded.stages[1].churn.fan == 3
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_refuses_a_pruning_it_cannot_record(tmp_path):
    from metricgp.errors import MetricGPError

    model = family_model("llama")
    norm = find_blocks(model)[1][0].input_layernorm
    norm.weight = nn.Parameter(norm.weight[:16].clone())
    with pytest.raises(MetricGPError, match="input_layernorm"):
        save_pruned(model, tmp_path)
    assert not (tmp_path / "config.json").exists()


def _train_windows(n: int = 4) -> torch.Tensor:
    return torch.randint(0, 300, (n, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_recovered_structured_model_saves_and_reloads_with_identical_logits(method, tmp_path):
    from metricgp.recover import build_teacher
    from metricgp.structured.recover import recover

    dense = family_model("llama")
    teacher = build_teacher(dense, _train_windows(), k=16, progress=False, cache_dir=tmp_path / "teacher")
    model = pruned_model("llama")
    untrained = logits(model, IDS)
    recover(model, _train_windows(), method=method, tokens=48, lr=1e-2, loss="ce+kd", teacher=teacher, progress=False)
    expected = logits(model, IDS)
    assert not torch.equal(expected, untrained)
    save_pruned(model, tmp_path / "m", per_layer=PER_LAYER)
    assert torch.equal(logits(load_pruned(tmp_path / "m"), IDS), expected)
    from transformers import AutoModelForCausalLM

    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval(), IDS), expected)


@pytest.mark.parametrize("method", ["lora", "full"])
def test_a_recovered_sparse_model_saves_and_reloads_with_its_zeros_and_logits(method, tmp_path):
    from transformers import AutoModelForCausalLM

    from metricgp.models import prunable_layers
    from metricgp.prune.patterns import NM
    from metricgp.recover import recover, sparse_masks

    model = family_model("llama")
    with torch.no_grad():
        for layer in prunable_layers(model).values():
            layer.weight.mul_(NM(2, 4).mask(layer.weight.abs()))
    masks = sparse_masks(model)
    recover(model, _train_windows(), method=method, tokens=48, lr=1e-2, masks=masks, progress=False)
    expected = logits(model, IDS)
    model.save_pretrained(tmp_path / "m")
    for reloaded in (load_pruned(tmp_path / "m"), AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()):
        assert torch.equal(logits(reloaded, IDS), expected)
        assert all(torch.equal(layer.weight != 0, masks[n]) for n, layer in prunable_layers(reloaded).items())
