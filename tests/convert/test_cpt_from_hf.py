"""experiment=cpt_from_hf: the model shape comes from the import-hf OUT_DIR; the imported
checkpoint (written at one rank) trains at TP2 / PP2; a conflicting model override is an error
naming both values."""

import pytest
import torch

from msa_train.convert.importer import import_hf
from tests.convert.helpers import attention_file, make_hf_model
from tests.trainer.helpers import SMALL, run_train

pytestmark = pytest.mark.slow
ATTN = "block_size: 16\ntopk: 4\nindex_dim: 8\ndense_first_layers: 1\n"


@pytest.fixture(scope="module")
def imported(tmp_path_factory, megatron_1rank):
    tmp = tmp_path_factory.mktemp("cpt")
    # vocab 300 >= the byte tokenizer's 257 (the stdlib corpus); 4 layers so that PP2 splits them.
    _, hf_dir = make_hf_model(tmp, "llama", vocab_size=300, num_hidden_layers=4,
                            num_key_value_heads=2)
    out = tmp / "converted"
    import_hf(hf_dir, str(out), attention=attention_file(tmp, ATTN), dtype="fp32", progress=False)
    return str(out)


# The attention layout (block 16, top-4, index_dim 8) comes from the import.
BASE = ["experiment=cpt_from_hf", "data=stdlib", "stage=tiny", *SMALL]


@pytest.mark.parametrize("layout,nproc", [(["parallel.tp=2", "parallel.sequence_parallel=true"], 2),
                                          (["parallel.pp=2"], 2)])
def test_trains_at_another_layout_and_exports(imported, tmp_path, layout, nproc):
    import transformers as tf

    from msa_train.convert.exporter import export_hf
    from tests.convert.helpers import megatron_sparse_from_save, rel_err

    save = str(tmp_path / "save")
    result = run_train([*BASE, f"checkpoint.init_from={imported}", f"checkpoint.save={save}",
                        *layout], str(tmp_path / "run"), nproc=nproc)
    assert f"init_from {imported}/iter_0000000: loaded 33 tensors" in result.stdout, result.stdout[-3000:]
    # The checkpoint written at this layout exports; it equals the one-rank Megatron model.
    out = str(tmp_path / "hf")
    export_hf(save, out, progress=False)
    hf = tf.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    tokens = torch.randint(0, 257, (1, 70), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = megatron_sparse_from_save(save)(tokens, torch.arange(70)[None], None).float()
        got = hf.eval()(tokens).logits
    assert rel_err(got, expected) <= 1e-4, rel_err(got, expected)


def test_conflicting_model_override_names_both_values(imported, tmp_path):
    result = run_train([*BASE, "checkpoint.save=null", f"checkpoint.init_from={imported}",
                        "model.hidden_size=64"],
                       str(tmp_path / "run"), expect_rc=2)
    assert "model.hidden_size=64" in result.stdout and "has 40" in result.stdout, result.stdout[-2000:]


def test_needs_an_import_output(tmp_path):
    result = run_train([*BASE, "checkpoint.save=null", f"checkpoint.init_from={tmp_path}"],
                       str(tmp_path / "run"), expect_rc=2)
    assert "not an `msa-convert import-hf` output" in result.stdout, result.stdout[-2000:]
