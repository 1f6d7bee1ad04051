"""The model and the data: a tiny transformers-5 Mixtral on four synthetic "languages".

Every process (server, each node) builds the same model and data from the seed; nothing is
downloaded.  The model is ``MixtralForCausalLM`` built from a ``MixtralConfig`` with random
weights: 2 decoder layers, each a ``MixtralSparseMoeBlock`` with 8 experts (top-2), whose experts
are two fused tensors ``gate_up_proj`` (8, 2I, H) and ``down_proj`` (8, H, I).

The data is a next-token task over one shared vocabulary of 64 tokens.  Language ``l`` (0..3) is
a first-order Markov grammar: each sequence starts with the language's tag token ``l``, then every
token ``t`` is followed by ``successor_l[t]`` (a permutation of the word tokens drawn from the
seed) with probability 0.9 and by a uniformly random word token otherwise.  The four languages
share the tokens but not the successors, so a model must read the tag to predict well: a model
that ignores it gets at most about 0.9 / 4 on the word tokens; chance is 1 / 60.  One language
per node (node ``i`` speaks language ``i % 4``).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

VOCAB, LANGUAGES, SEQ_LEN, NOISE = 64, 4, 16, 0.1
EXPERTS, TOP_K = 8, 2
IGNORE = -100


def config():
    from transformers import MixtralConfig
    return MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, num_local_experts=EXPERTS,
                         num_experts_per_tok=TOP_K, max_position_embeddings=2 * SEQ_LEN, tie_word_embeddings=False,
                         router_aux_loss_coef=0.0, output_router_logits=False)


def build_model(seed: int = 0):
    """``MixtralForCausalLM`` with random weights drawn from ``seed`` (the same in every process)."""
    from transformers import MixtralForCausalLM
    torch.manual_seed(seed)
    return MixtralForCausalLM(config())


@lru_cache(maxsize=4)
def grammars(seed: int = 0) -> np.ndarray:
    """``successor[l, t]``: the token that follows word token ``t`` in language ``l`` (tags 0..3 unused)."""
    rng = np.random.default_rng([seed, 7])
    words = np.arange(LANGUAGES, VOCAB)
    table = np.zeros((LANGUAGES, VOCAB), dtype=np.int64)
    for lang in range(LANGUAGES):
        table[lang, words] = rng.permutation(words)
    return table


def sentences(language: int, n: int, rng: np.random.Generator, seed: int = 0) -> np.ndarray:
    """``n`` sequences of ``SEQ_LEN + 1`` tokens of ``language``: its tag, then the Markov chain."""
    succ = grammars(seed)[language]
    out = np.empty((n, SEQ_LEN + 1), dtype=np.int64)
    out[:, 0] = language
    out[:, 1] = rng.integers(LANGUAGES, VOCAB, size=n)
    for t in range(2, SEQ_LEN + 1):
        noisy = rng.random(n) < NOISE
        out[:, t] = np.where(noisy, rng.integers(LANGUAGES, VOCAB, size=n), succ[out[:, t - 1]])
    return out


def to_batches(seqs: np.ndarray, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(ids, labels)`` batches: labels are the ids shifted left, the last position ``IGNORE``; the
    tag is never a target (position 0 predicts the first word, which is uniform: also ``IGNORE``)."""
    ids = torch.from_numpy(seqs[:, :-1].copy())
    labels = torch.from_numpy(seqs[:, 1:].copy())
    labels[:, 0] = IGNORE                       # the first word is uniformly random: nothing to learn
    return [(ids[i:i + batch], labels[i:i + batch]) for i in range(0, len(ids), batch)]


def language_of(partition_id: int) -> int:
    return partition_id % LANGUAGES


def node_batches(partition_id: int, seed: int = 0, sequences: int = 256, batch: int = 32,
                 round_: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The node's training batches: ``sequences`` of its language, drawn anew every round (seeded)."""
    rng = np.random.default_rng([seed, 1, partition_id, round_])
    return to_batches(sentences(language_of(partition_id), sequences, rng, seed), batch)


def node_validation(partition_id: int, seed: int = 0, sequences: int = 64,
                    batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The node's own held-out sequences (federated evaluation)."""
    rng = np.random.default_rng([seed, 2, partition_id])
    return to_batches(sentences(language_of(partition_id), sequences, rng, seed), batch)


@lru_cache(maxsize=2)
def test_batches(seed: int = 0, per_language: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The server's held-out set: ``per_language`` sequences of every language."""
    rng = np.random.default_rng([seed, 3])
    seqs = np.concatenate([sentences(lang, per_language, rng, seed) for lang in range(LANGUAGES)])
    return to_batches(seqs, 128)


def token_scores(model, batches) -> tuple[float, float, int]:
    """(token accuracy, mean cross-entropy, tokens) of ``model`` on ``batches``; IGNORE skipped."""
    model.eval()
    correct, loss, n = 0.0, 0.0, 0
    with torch.no_grad():
        for ids, labels in batches:
            logits = model(input_ids=ids).logits
            keep = labels != IGNORE
            loss += float(F.cross_entropy(logits[keep], labels[keep], reduction="sum"))
            correct += float((logits.argmax(dim=-1)[keep] == labels[keep]).sum())
            n += int(keep.sum())
    return correct / n, loss / n, n


def local_train(model, batches, *, epochs: int = 1, lr: float = 0.01, on_batch=lambda logits, labels: None) -> int:
    """The user's own PyTorch loop (shared by the aligned and FedAvg paths); returns the tokens trained on."""
    optimiser = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    tokens = 0
    for _ in range(epochs):
        for ids, labels in batches:
            optimiser.zero_grad()
            logits = model(input_ids=ids).logits
            F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE).backward()
            optimiser.step()
            on_batch(logits, labels)
            tokens += int((labels != IGNORE).sum())
    return tokens


def state_arrays(model) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in model.state_dict().items()}


def initial_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """The initial model as numpy arrays (float32), the same in every process."""
    return state_arrays(build_model(seed))


def central_accuracy(arrays: dict[str, np.ndarray], seed: int = 0) -> tuple[float, float]:
    """(token accuracy, loss) of ``arrays`` on the server's held-out set of all four languages."""
    model = build_model(seed)
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in arrays.items()})
    acc, loss, _ = token_scores(model, test_batches(seed))
    return acc, loss


def initial_model(num_experts: int = EXPERTS) -> dict[str, np.ndarray]:
    """NVFlare's ``initial_model`` hook (``hf_moe.task:initial_model``)."""
    return initial_arrays(0)


def central_evaluation(arrays: dict) -> dict:
    """NVFlare's ``central_evaluation`` hook: token accuracy on the held-out set of all languages."""
    acc, loss = central_accuracy(arrays, 0)
    return {"accuracy": acc, "loss": loss}
