"""fastcon.integrations.sentence_transformers.SupConLoss with a real sentence-transformers model:
a tiny BERT built offline (random weights, a WordPiece vocabulary written to a temporary folder),
trained a few steps by SentenceTransformerTrainer with the GROUP_BY_LABEL batch sampler."""

from __future__ import annotations

import math

import pytest
import torch

import fastcon.functional as FC
from fastcon.integrations.sentence_transformers import SupConLoss

st = pytest.importorskip("sentence_transformers")
transformers = pytest.importorskip("transformers")
datasets = pytest.importorskip("datasets")

try:  # sentence-transformers >= 6
    from sentence_transformers.base.sampler import BatchSamplers
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer
except ImportError:  # older layouts
    from sentence_transformers.models import Pooling, Transformer
    from sentence_transformers.training_args import BatchSamplers

WORDS = "the a cat dog bird fish sat ran flew swam on in mat park sky sea red blue fast slow big small".split()
TOPICS = {  # three classes of short sentences; each row holds two different sentences of its class (two views)
    0: [("the cat sat on the mat", "a small cat sat"), ("the red cat ran", "a big cat sat on a mat"),
        ("a cat sat in the park", "the blue cat sat"), ("a slow cat ran on the mat", "the small red cat sat")],
    1: [("the dog ran in the park", "a fast dog ran"), ("the big dog ran in a park", "a blue dog ran"),
        ("a dog ran on the mat", "the red dog ran fast"), ("a small dog ran", "the fast big dog ran in the park")],
    2: [("the fish swam in the sea", "a slow fish swam"), ("the small fish swam", "a red fish swam in the sea"),
        ("a big fish swam", "the blue fish swam in a sea"), ("a fish swam slow", "the fast fish swam in the sea")],
}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    # the vocabulary file is the first positional argument in transformers 4 (vocab_file) and 5 (vocab)
    tokenizer = transformers.BertTokenizerFast(str(folder / "vocab.txt"))
    assert tokenizer.unk_token_id not in tokenizer(" ".join(WORDS))["input_ids"], "the tiny vocabulary was not loaded"
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=2, intermediate_size=64, max_position_embeddings=32,
                                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    transformers.BertModel(config).save_pretrained(folder)
    encoder = Transformer(str(folder), max_seq_length=16)
    return st.SentenceTransformer(modules=[encoder, Pooling(32)], device="cpu")


def _dataset():
    rows = {"first": [], "second": [], "label": []}
    for label, pairs in TOPICS.items():
        for first, second in pairs:
            rows["first"].append(first)
            rows["second"].append(second)
            rows["label"].append(label)
    return datasets.Dataset.from_dict(rows)


def _preprocess(model, texts):
    prepare = getattr(model, "preprocess", None) or model.tokenize
    return prepare(texts)


def _loss_and_direct_loss(model, loss_fn, rows, labels):
    """The loss module on the dataset's columns, and fastcon's loss of the same columns embedded
    independently, by the model's own ``encode`` (in eval mode, without gradients)."""
    columns = ("first", "second")
    features = [_preprocess(model, rows[column]) for column in columns]
    model.eval()
    with torch.no_grad():
        loss = loss_fn(features, labels)
        views = torch.stack([model.encode(rows[column], convert_to_tensor=True) for column in columns], dim=1)
    direct = FC.supcon_loss(views, labels, temperature=loss_fn.supcon.temperature,
                            base_temperature=loss_fn.supcon.base_temperature)
    return loss, direct, views


def test_loss_is_fastcon_supcon_of_the_embedded_columns(model):
    rows = _dataset()
    labels = torch.tensor(rows["label"])
    loss_fn = SupConLoss(model, temperature=0.1)
    loss, direct, views = _loss_and_direct_loss(model, loss_fn, rows, labels)
    assert math.isfinite(loss.item()) and loss.item() > 0
    torch.testing.assert_close(loss, direct, rtol=1e-5, atol=1e-6)
    # without labels, two columns are instance discrimination: a text's positive is its own row's other column
    features = [_preprocess(model, rows[column]) for column in ("first", "second")]
    with torch.no_grad():
        unlabelled = loss_fn(features, None)
    torch.testing.assert_close(unlabelled, FC.supcon_loss(views, temperature=0.1), rtol=1e-5, atol=1e-6)
    assert loss_fn.get_config_dict() == {"temperature": 0.1, "base_temperature": 0.07, "contrast_mode": "all",
                                         "gather": False}


def test_trainer_with_group_by_label_sampler(model, tmp_path):
    loss_fn = SupConLoss(model, temperature=0.1)
    rows = _dataset()
    labels = torch.tensor(rows["label"])
    loss_before, _, _ = _loss_and_direct_loss(model, loss_fn, rows, labels)
    params_before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = st.SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=6, learning_rate=5e-3,
        batch_sampler=BatchSamplers.GROUP_BY_LABEL, logging_steps=1, save_strategy="no", report_to=[],
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    trainer = st.SentenceTransformerTrainer(model=model, args=args, train_dataset=rows, loss=loss_fn)
    trainer.train()

    step_losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(step_losses) == 4 and all(math.isfinite(x) and x > 0 for x in step_losses), step_losses
    changed = [name for name, p in model.named_parameters() if not torch.equal(p.detach(), params_before[name])]
    assert changed, "training changed no parameter"
    # the trained model, its loss over the whole dataset lower, still gives fastcon's loss of its embeddings
    loss_after, direct, _ = _loss_and_direct_loss(model, loss_fn, rows, labels)
    assert loss_after.item() < loss_before.item(), (loss_before.item(), loss_after.item())
    torch.testing.assert_close(loss_after, direct, rtol=1e-5, atol=1e-6)


def test_gather_and_bad_arguments_pass_through(model):
    loss_fn = SupConLoss(model, gather=True)
    assert loss_fn.supcon.gather is True
    with pytest.raises(ValueError, match="temperature"):
        SupConLoss(model, temperature=-1.0)
    with pytest.raises(ValueError, match="contrast_mode"):
        SupConLoss(model, contrast_mode="both")
    with pytest.raises(TypeError, match="labels"):  # a float "score" column is not a class label
        loss_fn = SupConLoss(model)
        loss_fn.compute_loss_from_embeddings([torch.randn(4, 32)] * 2, torch.rand(4))
