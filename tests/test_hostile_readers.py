"""Issue 23, "every reader checks what it reads": hostile `.bin` files on the paths that load
weights (import, generate), checksums on every reader of a checkpoint directory, non-finite
and non-floating weights, damaged meta records, the checkpoint a command resolves, prompt files
decoded in bounded batches. Each refusal exits 2 with one line and no traceback, and changes
nothing outside `--out`."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch

from mtp_cli.builders.model_builder import build_model
from mtp_cli.config.loader import load_spec
from tests.cli_helpers import run_mtp
from tests.generate_helpers import save_run_dir, tiny_spec
from tests.hf_models import llama_config, saved_model
from tests.hostile_checks import listing, refused
from tests.train_helpers import make_corpus

STEP0 = Path("checkpoints") / "step_0000000"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A run directory whose step-0 checkpoint records SHA-256 checksums (and a corpus)."""
    root = tmp_path_factory.mktemp("readers")
    corpus = make_corpus(root / "corpus")
    data = tiny_spec(depths=1, vocab=320, hidden=32, seq_length=32).model_dump(mode="json")
    data["data"]["path"] = str(corpus)
    data["checkpoint"]["checksums"] = True
    spec = load_spec(data)
    return save_run_dir(build_model(spec).eval(), spec, root / "run")


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    return copy


def _shard(checkpoint: Path) -> Path:
    return sorted(checkpoint.glob("*.distcp"))[0]


def test_a_changed_shard_is_refused_by_every_reader_of_the_checkpoint_directory(run_dir,
                                                                                tmp_path):
    """Broken 6: 4 KiB overwritten in a shard of a checkpoint that records checksums."""
    run = _copy_run(run_dir, tmp_path)
    checkpoint = run / STEP0
    shard = _shard(checkpoint)
    with open(shard, "r+b") as handle:
        handle.seek(min(512, shard.stat().st_size - 4096))
        handle.write(b"\x7f" * 4096)
    before = listing(run)
    for args in (("inspect-ckpt", checkpoint, "--strict"), ("inspect-ckpt", checkpoint),
                 ("export", checkpoint, "--out", tmp_path / "hf"),
                 ("generate", checkpoint, "--prompt", "a", "--max-new-tokens", "2"),
                 ("eval", checkpoint, "--tokens", "32")):
        refused(run_mtp(*args), shard.name, "SHA-256")
    assert not (tmp_path / "hf").exists()
    assert listing(run) == before


def _bin_directory(tmp_path: Path, edit=None) -> Path:
    """A Llama directory with its weights in one `pytorch_model.bin` (`edit` changes them)."""
    from safetensors.torch import load_file

    directory, _, _ = saved_model(tmp_path, llama_config(num_mtp_layers=0))
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(path))
        path.unlink()
    (directory / "model.safetensors.index.json").unlink(missing_ok=True)
    if edit is not None:
        edit(tensors, directory)
    torch.save(tensors, directory / "pytorch_model.bin")
    return directory


def _vocab(tensors: dict[str, torch.Tensor], directory: Path, vocab: int) -> None:
    """Embedding and head as `zeros(1).expand(vocab, hidden)` and config.json's vocab_size."""
    hidden = tensors["model.embed_tokens.weight"].shape[1]
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        tensors[name] = torch.zeros(1).expand(vocab, hidden)
    config = json.loads((directory / "config.json").read_text())
    config["vocab_size"] = vocab
    (directory / "config.json").write_text(json.dumps(config))


def test_a_stride0_bin_is_refused_by_import_and_generate(tmp_path):
    """Broken 4: a few bytes of `.bin` presenting 2^16 x hidden elements per tensor."""
    hf = _bin_directory(tmp_path, lambda t, d: _vocab(t, d, 2**16))
    assert (hf / "pytorch_model.bin").stat().st_size < 200_000
    before = listing(tmp_path)
    refused(run_mtp("import", hf, "--out", tmp_path / "out"), "pytorch_model.bin", "stride-0")
    refused(run_mtp("generate", hf, "--prompt", "a"), "pytorch_model.bin", "stride-0")
    assert listing(tmp_path) == before


def _cut_records(path: Path) -> int:
    """Rewrite the archive with every storage record cut to half its bytes (a valid zip:
    only the records' own sizes say so). Returns how many records were cut."""
    with zipfile.ZipFile(path) as archive:
        members = [(info.filename, archive.read(info)) for info in archive.infolist()]
    cut = 0
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            if "/data/" in name and len(data) >= 64:
                data, cut = data[:len(data) // 2], cut + 1
            archive.writestr(name, data)
    return cut


def test_a_bin_with_records_cut_short_is_refused(tmp_path):
    """Broken 5: torch.load(mmap=True) would read each short record on into its neighbours."""
    hf = _bin_directory(tmp_path)
    assert _cut_records(hf / "pytorch_model.bin") > 10
    before = listing(tmp_path)
    text = refused(run_mtp("import", hf, "--out", tmp_path / "out"), "pytorch_model.bin",
                   "cut short")
    assert len(text.strip().splitlines()) == 1
    refused(run_mtp("generate", hf, "--prompt", "a"), "cut short")
    refused(run_mtp("inspect-ckpt", hf / "pytorch_model.bin"), "cut short")
    assert listing(tmp_path) == before


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_import_refuses_integer_or_bool_projection_weights(tmp_path, dtype):
    def edit(tensors, _directory):
        name = "model.layers.0.self_attn.o_proj.weight"
        tensors[name] = tensors[name].to(dtype)

    hf = _bin_directory(tmp_path, edit)
    refused(run_mtp("import", hf, "--out", tmp_path / "out"), "o_proj.weight",
            "not a floating-point weight")
    assert not (tmp_path / "out").exists()


def test_import_and_generate_refuse_a_nan_weight_naming_it(tmp_path):
    def edit(tensors, _directory):
        tensors["model.layers.1.mlp.down_proj.weight"][3, 4] = float("nan")

    hf = _bin_directory(tmp_path, edit)
    refused(run_mtp("import", hf, "--out", tmp_path / "out"), "down_proj.weight", "non-finite")
    refused(run_mtp("generate", hf, "--prompt", "a"), "non-finite")
    assert not (tmp_path / "out").exists()


def _nan_checkpoint(run_dir: Path, tmp_path: Path) -> Path:
    """The run's checkpoint rewritten with one NaN in a weight (checksums off)."""
    from tests.ckpt_helpers import rewrite_dcp

    def edit(state):
        state["decoder.layers.0.mlp.linear_fc2.weight"][0, 0] = float("nan")

    source = run_dir / STEP0
    target = rewrite_dcp(source, tmp_path / "nan" / "checkpoints" / "step_0000000", edit)
    meta = json.loads((target / "meta.json").read_text())
    meta.pop("checksums", None)
    (target / "meta.json").write_text(json.dumps(meta))
    return target


def test_export_generate_eval_refuse_a_nan_weight_naming_it(run_dir, tmp_path):
    """Weak row: NaN weights were exported, generated and evaluated with exit 0, silently."""
    checkpoint = _nan_checkpoint(run_dir, tmp_path)
    before = listing(tmp_path / "nan")
    for args in (("export", checkpoint, "--out", tmp_path / "hf"),
                 ("generate", checkpoint, "--prompt", "a", "--max-new-tokens", "2"),
                 ("eval", checkpoint, "--tokens", "32")):
        refused(run_mtp(*args), "linear_fc2.weight", "non-finite")
    assert not (tmp_path / "hf").exists()
    assert listing(tmp_path / "nan") == before


@pytest.mark.parametrize("step", ['"20"', "true", "1" + "0" * 30])
def test_a_bad_step_in_meta_json_is_refused_by_every_reader(run_dir, tmp_path, step):
    """Weak row: `step: "20"`, `true` or 10^30 (train fell back; the others accepted it)."""
    run = _copy_run(run_dir, tmp_path)
    checkpoint = run / STEP0
    meta = json.loads((checkpoint / "meta.json").read_text())
    text = json.dumps({**meta, "step": 0}).replace('"step": 0', f'"step": {step}')
    (checkpoint / "meta.json").write_text(text)
    before = listing(run)
    for args in (("inspect-ckpt", checkpoint), ("export", checkpoint, "--out", tmp_path / "hf"),
                 ("generate", checkpoint, "--prompt", "a"), ("eval", checkpoint)):
        refused(run_mtp(*args), "meta.json", "step")
    assert listing(run) == before and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("checksums", ['"abc"', '{"__0_0.distcp": "xyz"}', "[1, 2]"])
def test_malformed_checksums_are_refused_by_every_reader(run_dir, tmp_path, checksums):
    run = _copy_run(run_dir, tmp_path)
    checkpoint = run / STEP0
    meta = json.loads((checkpoint / "meta.json").read_text())
    meta["checksums"] = json.loads(checksums)
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    for args in (("inspect-ckpt", checkpoint), ("export", checkpoint, "--out", tmp_path / "hf"),
                 ("generate", checkpoint, "--prompt", "a"), ("eval", checkpoint)):
        refused(run_mtp(*args), "meta.json", "checksums")


def test_eval_says_which_checkpoint_when_latest_is_damaged(run_dir, tmp_path):
    """Weak row: `mtp eval R` with a damaged `latest` evaluated an older checkpoint silently."""
    run = _copy_run(run_dir, tmp_path)
    (run / "checkpoints" / "latest").write_text("garbage\n")
    result = run_mtp("eval", run, "--tokens", "32", "--json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "note:" in result.stderr and "step_0000000" in result.stderr


def test_eval_of_the_train_split_keeps_the_validation_result(run_dir, tmp_path):
    """Weak row: `eval --split train` overwrote `eval/step_N.json` of the validation split."""
    run = _copy_run(run_dir, tmp_path)
    val = run_mtp("eval", run, "--tokens", "32", "--json")
    assert val.returncode == 0, val.stderr[-2000:]
    train = run_mtp("eval", run, "--tokens", "32", "--split", "train", "--json")
    assert train.returncode == 0, train.stderr[-2000:]
    assert json.loads((run / "eval" / "step_0000000.json").read_text())["split"] == "val"
    assert json.loads((run / "eval" / "step_0000000.train.json").read_text())["split"] == "train"


def test_generate_without_meta_json_does_not_suggest_an_option_it_lacks(run_dir, tmp_path):
    run = _copy_run(run_dir, tmp_path)
    (run / STEP0 / "meta.json").unlink()
    for command in ("generate", "eval"):
        args = (command, run / STEP0) + (("--prompt", "a") if command == "generate" else ())
        text = refused(run_mtp(*args), "stores no spec")
        assert "pass --spec" not in text


def test_a_garbled_distcp_value_is_named_without_torch_documentation(run_dir, tmp_path):
    """Weak row: the message quoted torch's weights_only documentation."""
    from mtp_cli.checkpoint import load_state, read_metadata, value_entries

    run = _copy_run(run_dir, tmp_path)
    checkpoint = run / STEP0
    metadata = read_metadata(checkpoint)
    keys = value_entries(metadata)
    assert keys, "the checkpoint stores non-tensor values"
    info = next(v for k, v in metadata.storage_data.items() if k.fqn == keys[0])
    shard = checkpoint / info.relative_path
    with open(shard, "r+b") as handle:  # a pickle that weights_only refuses: a global
        handle.seek(info.offset)
        handle.write(b"\x80\x02cos\nsystem\n."[:info.length].ljust(info.length, b"."))
    with pytest.raises(Exception) as caught:
        load_state({keys[0]: None}, checkpoint, no_dist=True, metadata=metadata)
    message = str(caught.value)
    assert shard.name in message and keys[0] in message
    assert "weights_only" in message and "documentation" not in message.lower()
    assert len(message) < 400 and "\n" not in message


def test_prompts_are_decoded_in_batches_of_bounded_size(monkeypatch, run_dir):
    """Broken 7: 8.4M prompts were decoded as one batch, allocating for all of them."""
    from mtp_cli.generate import GenerateOptions, generate, load_for_generation
    from mtp_cli.generate import run as run_module

    sizes = []
    original = run_module.Sequences

    def spy(prompts, *args, **kwargs):
        sizes.append(len(prompts))
        return original(prompts, *args, **kwargs)

    monkeypatch.setattr(run_module, "Sequences", spy)
    loaded = load_for_generation(run_dir, device="cpu")
    prompts = [f"p{i}" for i in range(150)]
    result = generate(loaded, prompts, GenerateOptions(max_new_tokens=1, speculative="off"))
    assert len(result.texts) == 150 and all(len(ids) == 1 for ids in result.token_ids)
    assert max(sizes) <= 64 and sum(sizes) == 150
    one = generate(loaded, prompts[140:141], GenerateOptions(max_new_tokens=1,
                                                             speculative="off"))
    assert one.token_ids[0] == result.token_ids[140]  # batching changes no row's result


def test_speculative_statistics_add_up_over_batches(monkeypatch, run_dir):
    from mtp_cli.generate import GenerateOptions, generate, load_for_generation
    from mtp_cli.generate import run as run_module

    loaded = load_for_generation(run_dir, device="cpu")
    prompts = [f"x{i}" for i in range(5)]
    options = GenerateOptions(max_new_tokens=3)
    whole = generate(loaded, prompts, options)
    monkeypatch.setattr(run_module, "PROMPT_BATCH", 2)
    split = generate(loaded, prompts, options)
    assert split.token_ids == whole.token_ids and split.identical_to_plain is True
    # rounds count (row, round) pairs: each row decodes the same however the rows are batched
    for key in ("rounds", "mean_accepted_length"):
        assert split.speculative[key] == whole.speculative[key]
    assert split.speculative["main_forwards"] > whole.speculative["main_forwards"] > 0


def test_eval_reads_the_split_one_batch_at_a_time(monkeypatch, run_dir):
    """`--tokens 10^30` scores the whole split, never loading more than a batch of windows."""
    from mtp_cli.data.windows import TokenWindows
    from mtp_cli.generate import load_for_generation
    from mtp_cli.generate.eval import BATCH, evaluate

    read = []
    original = TokenWindows.windows

    def spy(self, indices):
        read.append(len(indices))
        return original(self, indices)

    monkeypatch.setattr(TokenWindows, "windows", spy)
    loaded = load_for_generation(run_dir, device="cpu")
    result = evaluate(loaded, tokens=10**30, write=False)
    assert result["windows"] > BATCH and max(read) <= BATCH
    assert sum(read) == result["windows"] + min(8, result["windows"])  # + the prompts' windows
