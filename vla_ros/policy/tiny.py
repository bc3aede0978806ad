"""Tiny OpenVLA checkpoints in the exact published format, for tests and CPU demos (about 1 MB).

``write_tiny_checkpoint`` writes a complete checkpoint directory the real loader reads through the
same code path as openvla-7b: ``config.json`` with every PrismaticConfig/OpenVLAConfig field (the
real ``timm_model_ids`` of the DINOv2-with-registers and SigLIP patch-14 families, shrunk through
the optional ``timm_model_kwargs`` field, a two-layer Llama ``text_config`` whose vocabulary is the
tokenizer's plus ``<PAD>`` padded to a multiple of 64, ``norm_stats`` of two datasets and an
``auto_map`` the loader must ignore), ``preprocessor_config.json`` with the bf16-rounded DINOv2
constants, a byte-fallback BPE SentencePiece tokenizer trained here on an embedded corpus of robot
instructions (its last 256 ids are the action tokens, ``<PAD>`` follows the base vocabulary) with
``tokenizer.json`` converted without protobuf, and weights sharded into two safetensors files with
an index. Everything is deterministic for a seed; weights are drawn with wide enough scales that
greedy decoding is not decided by rounding noise.
"""

from __future__ import annotations

import io
import json
import logging
import os
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vla_ros.core.errors import ConfigError
from vla_ros.policy.checkpoint import (
    CONFIG_FILE,
    DATASET_STATISTICS_FILE,
    PREPROCESSOR_FILE,
    SAFETENSORS_INDEX_FILE,
    TOKENIZER_JSON_FILE,
    TOKENIZER_MODEL_FILE,
    save_weights,
    sentencepiece_to_tokenizer_json,
)
from vla_ros.policy.model import OpenVLA

logger = logging.getLogger(__name__)

#: Base vocabulary of the tiny tokenizer (a multiple of 64, like Llama's 32000).
TINY_VOCAB_SIZE = 512
#: The pad token's id: right after the base vocabulary, as ``<PAD>`` = 32000 in Llama-2.
TINY_PAD_TOKEN_ID = TINY_VOCAB_SIZE
PAD_TO_MULTIPLE_OF = 64
#: DINOv2 (ImageNet) mean/std rounded to bf16, as derived OpenVLA checkpoints store them.
DINO_MEAN_BF16 = [0.484375, 0.455078125, 0.40625]
DINO_STD_BF16 = [0.228515625, 0.2236328125, 0.224609375]
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]
OPENVLA_TIMM_MODEL_IDS = ['vit_large_patch14_reg4_dinov2.lvd142m', 'vit_so400m_patch14_siglip_224']
#: timm overrides that shrink the two ViTs (patch 14 at 224 px keeps 256 patches).
TINY_TIMM_MODEL_KWARGS = [
    {'embed_dim': 32, 'depth': 3, 'num_heads': 2},
    {'embed_dim': 48, 'depth': 3, 'num_heads': 2, 'mlp_ratio': 2.0},
]
TINY_TEXT_CONFIG: dict[str, Any] = {
    'model_type': 'llama',
    'hidden_size': 64,
    'intermediate_size': 172,
    'num_hidden_layers': 2,
    'num_attention_heads': 4,
    'num_key_value_heads': 4,
    'max_position_embeddings': 2048,
    'rms_norm_eps': 1e-6,
    'torch_dtype': 'bfloat16',
}

_INSTRUCTIONS = """\
pick up the black bowl and place it on the plate
pick up the black bowl between the plate and the ramekin and place it on the plate
put the white mug on the left plate
put the spoon in the drawer and close it
open the top drawer of the cabinet
close the microwave door
move the red block to the left of the blue cup
stack the green cube on top of the yellow cube
wipe the table with the sponge
push the button on the right side
turn on the stove and put the moka pot on it
place the carrot on the plate
put the eggplant in the basket
fold the cloth from left to right
pick up the alphabet soup and place it in the basket
put the cream cheese in the bowl
put both the alphabet soup and the tomato sauce in the basket
put the ketchup in the top drawer
pick coke can
move near the apple
knock the sprite can over
place the orange into the top drawer
open the middle drawer
close the bottom drawer
put corn in pot which is in sink
flip the pot upright
put the knife on the cutting board
lift the lid off the pot
sweep the beans into the dustpan
hang the towel on the rack
pour the water into the glass
put the banana next to the bread
move the gripper up by 5 cm and rotate 90 degrees
set the table for 2 people
insert the peg into the hole
slide the block to the goal
press the switch twice
grasp the handle and pull
""".splitlines()

_TEMPLATE_LINES = [
    f'In: What action should the robot take to {line}?' for line in _INSTRUCTIONS[:20]
] + ['Out:', 'In: What action should the robot take to do it?', 'Out: 0123456789 .,;:!?()-']


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def train_tiny_sentencepiece(vocab_size: int = TINY_VOCAB_SIZE) -> bytes:
    """Train the tiny Llama-style tokenizer (BPE, byte fallback, identity normalization).

    Returns the serialized ``tokenizer.model``; deterministic (one thread, no sampling).
    """
    import sentencepiece as spm

    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_INSTRUCTIONS + _TEMPLATE_LINES), model_writer=out,
        vocab_size=vocab_size, model_type='bpe', byte_fallback=True, character_coverage=1.0,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, add_dummy_prefix=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False, split_digits=True,
        allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2,
        input_sentence_size=0, shuffle_input_sentence=False,
    )
    return out.getvalue()


def _padded(n: int, multiple: int = PAD_TO_MULTIPLE_OF) -> int:
    return -(-n // multiple) * multiple


def tiny_norm_stats(datasets: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Return OpenVLA-style ``norm_stats`` for ``datasets``.

    The first dataset is an end-effector one (mask ``[True] * 6 + [False]``: raw gripper); the
    others un-normalize every dimension.
    """
    out: dict[str, Any] = {}
    for index, name in enumerate(datasets):
        rng = np.random.RandomState(seed * 1000 + index)
        spread = np.round(rng.uniform(0.01, 0.05, 6), 6)
        q01 = [float(-s) for s in spread] + [0.0]
        q99 = [float(s * rng.uniform(0.8, 1.2)) for s in spread] + [1.0]
        mask = [True] * 6 + [index != 0]
        out[name] = {
            'action': {
                'mean': [round((a + b) / 2, 6) for a, b in zip(q01, q99, strict=True)],
                'std': [round((b - a) / 4, 6) for a, b in zip(q01, q99, strict=True)],
                'max': [round(b * 1.5, 6) for b in q99],
                'min': [round(a * 1.5, 6) for a in q01],
                'q01': q01,
                'q99': q99,
                'mask': mask,
            },
            'proprio': {k: [0.0] * 7 for k in ('mean', 'std', 'max', 'min', 'q01', 'q99')},
            'num_transitions': int(1000 + 37 * index),
            'num_trajectories': int(20 + index),
        }
    return out


def tiny_config(norm_stats: Mapping[str, Any],
                vocab_size: int = TINY_VOCAB_SIZE) -> dict[str, Any]:
    """Return the ``config.json`` of a tiny checkpoint (openvla-7b's fields, tiny sizes)."""
    pad_id = vocab_size
    padded = _padded(vocab_size + 1)
    text = dict(TINY_TEXT_CONFIG, vocab_size=padded, pad_token_id=pad_id)
    return {
        'arch_specifier': 'no-align+fused-gelu-mlp',
        'architectures': ['OpenVLAForActionPrediction'],
        'auto_map': {
            'AutoConfig': 'configuration_prismatic.OpenVLAConfig',
            'AutoModelForVision2Seq': 'modeling_prismatic.OpenVLAForActionPrediction',
        },
        'hf_llm_id': 'meta-llama/Llama-2-7b-hf',
        'image_resize_strategy': 'resize-naive',
        'image_sizes': [224, 224],
        'llm_backbone_id': 'llama2-7b-pure',
        'llm_max_length': 2048,
        'model_type': 'openvla',
        'n_action_bins': 256,
        'norm_stats': dict(norm_stats),
        'output_projector_states': False,
        'pad_to_multiple_of': PAD_TO_MULTIPLE_OF,
        'pad_token_id': pad_id,
        'text_config': text,
        'timm_model_ids': list(OPENVLA_TIMM_MODEL_IDS),
        'timm_model_kwargs': [dict(k) for k in TINY_TIMM_MODEL_KWARGS],
        'timm_override_act_layers': [None, None],
        'torch_dtype': 'bfloat16',
        'transformers_version': '4.40.1',
        'use_fused_vision_backbone': True,
        'vision_backbone_id': 'dinosiglip-vit-so-224px',
    }


def preprocessor_config() -> dict[str, Any]:
    """Return an OpenVLA ``preprocessor_config.json`` (fused, 224 px, bf16-rounded DINO stats)."""
    resize = {'antialias': True, 'interpolation': 3, 'max_size': None, 'size': [224, 224]}
    return {
        'auto_map': {
            'AutoImageProcessor': 'processing_prismatic.PrismaticImageProcessor',
            'AutoProcessor': 'processing_prismatic.PrismaticProcessor',
        },
        'image_processor_type': 'PrismaticImageProcessor',
        'image_resize_strategy': 'resize-naive',
        'input_sizes': [[3, 224, 224], [3, 224, 224]],
        'interpolations': ['bicubic', 'bicubic'],
        'means': [[0.485, 0.456, 0.406], [0.5, 0.5, 0.5]],
        'processor_class': 'PrismaticProcessor',
        'stds': [[0.229, 0.224, 0.225], [0.5, 0.5, 0.5]],
        'tvf_crop_params': [{'output_size': [224, 224]}, {'output_size': [224, 224]}],
        'tvf_do_letterbox': False,
        'tvf_letterbox_fill': None,
        'tvf_normalize_params': [
            {'inplace': False, 'mean': list(DINO_MEAN_BF16), 'std': list(DINO_STD_BF16)},
            {'inplace': False, 'mean': list(SIGLIP_MEAN_STD), 'std': list(SIGLIP_MEAN_STD)},
        ],
        'tvf_resize_params': [dict(resize), dict(resize)],
        'use_fused_vision_backbone': True,
    }


def _token_entry(content: str) -> dict[str, Any]:
    return {'content': content, 'lstrip': False, 'normalized': False, 'rstrip': False,
            'single_word': False}


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, i


def pad_sentencepiece(model: bytes, vocab_size: int) -> bytes:
    """Append unreachable pieces to a serialized SentencePiece model up to ``vocab_size`` ids.

    Protobuf surgery without protobuf: the ``ModelProto`` is a sequence of fields, the pieces
    (field 1) first; new ``SentencePiece`` entries (piece, score) are inserted after the last
    one. Each new piece is two private-use characters that no piece of the model contains, so
    neither SentencePiece nor the converted ``tokenizer.json`` ever produces one: the
    tokenization of any text is unchanged, only the id space grows (as Llama-2's has 32000 ids
    with its last 256 used as action tokens).
    """
    fields: list[tuple[int, bytes]] = []
    i = 0
    while i < len(model):
        start = i
        tag, i = _read_varint(model, i)
        wire = tag & 7
        if wire == 0:
            _, i = _read_varint(model, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _read_varint(model, i)
            i += length
        else:
            raise ConfigError(f'unexpected protobuf wire type {wire} in the SentencePiece model')
        fields.append((tag >> 3, model[start:i]))
    n_pieces = sum(1 for number, _ in fields if number == 1)
    if vocab_size < n_pieces:
        raise ConfigError(f'vocab_size {vocab_size} is smaller than the model ({n_pieces})')
    extra = []
    for k in range(vocab_size - n_pieces):
        piece = (chr(0xE000 + k // 256) + chr(0xF000 + k % 256)).encode('utf-8')
        entry = b'\x0a' + _varint(len(piece)) + piece + b'\x15' + struct.pack('<f', -1e4 - k)
        extra.append(b'\x0a' + _varint(len(entry)) + entry)
    last = max(j for j, (number, _) in enumerate(fields) if number == 1)
    parts = [raw for _, raw in fields[:last + 1]] + extra + [raw for _, raw in fields[last + 1:]]
    return b''.join(parts)


def tokenizer_files(vocab_size: int = TINY_VOCAB_SIZE,
                    pad_to: int | None = None) -> dict[str, bytes]:
    """Return ``{file name: bytes}`` of the tiny tokenizer in the Llama-2 / OpenVLA layout.

    ``pad_to`` (e.g. 32000) grows the id space to that size with unreachable pieces
    (``pad_sentencepiece``), for checkpoints of the real vocabulary size.
    """
    model = train_tiny_sentencepiece(vocab_size)
    if pad_to is not None:
        model = pad_sentencepiece(model, pad_to)
        vocab_size = pad_to
    pad_id = vocab_size
    specials = {0: '<unk>', 1: '<s>', 2: '</s>', pad_id: '<PAD>'}
    config = {
        'add_bos_token': True,
        'add_eos_token': False,
        'added_tokens_decoder': {str(i): dict(_token_entry(c), special=True)
                                 for i, c in specials.items()},
        'auto_map': {'AutoProcessor': 'processing_prismatic.PrismaticProcessor'},
        'bos_token': '<s>',
        'clean_up_tokenization_spaces': False,
        'eos_token': '</s>',
        'legacy': False,
        'model_max_length': 2048,
        'pad_token': '<PAD>',
        'padding_side': 'right',
        'processor_class': 'PrismaticProcessor',
        'sp_model_kwargs': {},
        'tokenizer_class': 'LlamaTokenizer',
        'unk_token': '<unk>',
        'use_default_system_prompt': False,
    }
    special_map = {'bos_token': _token_entry('<s>'), 'eos_token': _token_entry('</s>'),
                   'pad_token': _token_entry('<PAD>'), 'unk_token': _token_entry('<unk>')}
    files = {
        TOKENIZER_MODEL_FILE: model,
        'tokenizer_config.json': _json_bytes(config),
        'special_tokens_map.json': _json_bytes(special_map),
        'added_tokens.json': _json_bytes({'<PAD>': pad_id}),
    }
    return files


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + '\n').encode('utf-8')


def init_tiny_weights(model: torch.nn.Module, seed: int = 0,
                      round_to: torch.dtype | None = torch.bfloat16) -> None:
    """Fill every parameter of ``model`` deterministically from ``seed``.

    Linear/conv weights ~ N(0, 1/fan_in), embeddings ~ N(0, 1), norm weights ~ 1 + N(0, 0.1^2),
    biases ~ N(0, 0.02^2), LayerScale ``scale_factor`` ~ U(0.5, 1), position embeddings and
    prefix tokens ~ N(0, 0.5^2). Values are rounded to ``round_to`` (the stored dtype) so the
    saved and the in-memory model agree exactly.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for name, param in model.named_parameters():
            shape = tuple(param.shape)
            leaf = name.rsplit('.', 1)[-1]
            if leaf == 'scale_factor':
                value = 0.5 + 0.5 * torch.rand(shape, generator=gen)
            elif leaf in ('pos_embed', 'cls_token', 'reg_token', 'latent'):
                value = 0.5 * torch.randn(shape, generator=gen)
            elif name.endswith('embed_tokens.weight'):
                value = torch.randn(shape, generator=gen)
            elif param.ndim == 1 and ('norm' in name or 'layernorm' in name):
                value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            elif param.ndim == 1:
                value = 0.02 * torch.randn(shape, generator=gen)
            else:
                fan_in = int(np.prod(shape[1:]))
                value = torch.randn(shape, generator=gen) / np.sqrt(fan_in)
            if round_to is not None:
                value = value.to(round_to).float()
            param.copy_(value.to(param.dtype))


def build_tiny_model(seed: int = 0, datasets: Sequence[str] = ('bridge_orig', 'libero_spatial'),
                     dtype: torch.dtype = torch.float32) -> OpenVLA:
    """Return the in-memory model ``write_tiny_checkpoint`` saves (same seed, same weights)."""
    model = OpenVLA.from_config(tiny_config(tiny_norm_stats(datasets, seed)), dtype=torch.float32)
    init_tiny_weights(model, seed)
    return model.to(dtype).eval()


# --------------------------------------------------------------------------------------------
# The writer
# --------------------------------------------------------------------------------------------


def write_tiny_checkpoint(path: str | os.PathLike[str], *, seed: int = 0,
                          datasets: Sequence[str] = ('bridge_orig', 'libero_spatial'),
                          with_dataset_statistics: bool = False,
                          dataset_statistics_key: str = 'tiny_finetune',
                          dtype: torch.dtype = torch.bfloat16, n_shards: int = 2,
                          with_tokenizer_json: bool = True) -> Path:
    """Write a complete tiny OpenVLA checkpoint directory and return its path.

    Args:
        path: Directory to create or fill (existing files of the same names are replaced).
        seed: Seed of the weights and statistics; the same seed gives identical bytes.
        datasets: ``norm_stats`` keys; the first gets the EEF gripper mask ``[T]*6 + [F]``.
        with_dataset_statistics: Also write ``dataset_statistics.json`` holding only
            ``dataset_statistics_key`` (it replaces ``norm_stats``, as in fine-tuned dirs).
        dataset_statistics_key: The key of that file's single dataset.
        dtype: Stored weight dtype (bf16 like openvla-7b).
        n_shards: 1 writes ``model.safetensors``; more write shards plus the index.
        with_tokenizer_json: Also write ``tokenizer.json`` (converted from the SentencePiece
            model; the real checkpoints ship one).

    Returns:
        The checkpoint directory.

    """
    if not datasets or len(set(datasets)) != len(datasets):
        raise ConfigError(f'datasets must be distinct, non-empty names, got {datasets!r}')
    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    stats = tiny_norm_stats(datasets, seed)
    config = tiny_config(stats)
    files = tokenizer_files()
    files[CONFIG_FILE] = _json_bytes(config)
    files[PREPROCESSOR_FILE] = _json_bytes(preprocessor_config())
    files['generation_config.json'] = _json_bytes({
        '_from_model_config': True, 'bos_token_id': 1, 'eos_token_id': 2,
        'pad_token_id': TINY_PAD_TOKEN_ID, 'transformers_version': '4.40.1'})
    if with_dataset_statistics:
        override = tiny_norm_stats([dataset_statistics_key], seed + 1)
        override[dataset_statistics_key]['action']['q99'][0] += 0.5  # clearly not norm_stats
        files[DATASET_STATISTICS_FILE] = _json_bytes(override)
    for name, data in files.items():
        (directory / name).write_bytes(data)
    if with_tokenizer_json:
        text = sentencepiece_to_tokenizer_json(directory / TOKENIZER_MODEL_FILE,
                                               {'<PAD>': TINY_PAD_TOKEN_ID})
        (directory / TOKENIZER_JSON_FILE).write_text(text + '\n', encoding='utf-8')
    model = OpenVLA.from_config(config, dtype=torch.float32)
    init_tiny_weights(model, seed, round_to=dtype)
    save_weights(model, directory, n_shards=n_shards, dtype=dtype)
    logger.debug('wrote tiny OpenVLA checkpoint to %s', directory)
    return directory


# --------------------------------------------------------------------------------------------
# Random-weight checkpoints of real sizes (benchmarks)
# --------------------------------------------------------------------------------------------

#: The architecture fields of openvla/openvla-7b's ``config.json`` (DESIGN section 4).
OPENVLA_7B_FIELDS: dict[str, Any] = {
    'timm_model_ids': list(OPENVLA_TIMM_MODEL_IDS),
    'timm_model_kwargs': None,
    'text_config': {'model_type': 'llama', 'vocab_size': 32064, 'pad_token_id': 32000,
                    'hidden_size': 4096, 'intermediate_size': 11008, 'num_hidden_layers': 32,
                    'num_attention_heads': 32, 'num_key_value_heads': 32,
                    'max_position_embeddings': 2048, 'rms_norm_eps': 1e-6,
                    'torch_dtype': 'bfloat16'},
    'pad_token_id': 32000,
}


def openvla_7b_config(datasets: Sequence[str] = ('bridge_orig',)) -> dict[str, Any]:
    """``config.json`` of an openvla-7b-shaped checkpoint (real fields, tiny statistics)."""
    config = tiny_config(tiny_norm_stats(datasets), vocab_size=32000)
    config.update({k: v for k, v in OPENVLA_7B_FIELDS.items() if v is not None})
    config.pop('timm_model_kwargs')
    return config


def _random_value(name: str, shape: tuple[int, ...], device: torch.device, seed: int,
                  dtype: torch.dtype) -> torch.Tensor:
    """Name-seeded values: norms 1, biases 0, LayerScale 0.1, everything else N(0, 0.02)."""
    import zlib

    leaf = name.rsplit('.', 1)[-1]
    if len(shape) == 1 and 'norm' in name and leaf == 'weight':
        return torch.ones(shape, device=device, dtype=dtype)
    if len(shape) == 1 and leaf == 'bias':
        return torch.zeros(shape, device=device, dtype=dtype)
    if leaf == 'scale_factor':
        return torch.full(shape, 0.1, device=device, dtype=dtype)
    gen = torch.Generator(device=device).manual_seed(seed + zlib.crc32(name.encode()))
    return torch.empty(shape, device=device, dtype=torch.float32).normal_(
        0.0, 0.02, generator=gen).to(dtype)


def write_random_checkpoint(path: str | os.PathLike[str], config: Mapping[str, Any], *,
                            n_shards: int = 3, vocab_size: int = 32000,
                            device: torch.device | str = 'cpu', seed: int = 0,
                            dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write a random-weight checkpoint of ``config``'s sizes in the published layout.

    Shards (``model-0000i-of-0000n.safetensors`` + index, as openvla-7b ships in 3 bf16
    shards), the real ``config.json`` fields, ``preprocessor_config.json`` and a Llama-style
    SentencePiece tokenizer of ``vocab_size`` ids (``tokenizer_files(pad_to=...)``) with
    ``tokenizer.json``. Weights are generated on ``device`` one tensor at a time and written
    shard by shard, so host memory holds one shard at most.
    """
    from safetensors.torch import save_file

    directory = Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    files = tokenizer_files(pad_to=vocab_size)
    files[CONFIG_FILE] = _json_bytes(dict(config))
    files[PREPROCESSOR_FILE] = _json_bytes(preprocessor_config())
    for name, data in files.items():
        (directory / name).write_bytes(data)
    text = sentencepiece_to_tokenizer_json(directory / TOKENIZER_MODEL_FILE,
                                           {'<PAD>': vocab_size})
    (directory / TOKENIZER_JSON_FILE).write_text(text + '\n', encoding='utf-8')
    meta = OpenVLA.from_config(config, dtype=dtype, device='meta')
    shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
    del meta
    nbytes = {k: int(np.prod(s)) * torch.finfo(dtype).bits // 8 for k, s in shapes.items()}
    total = sum(nbytes.values())
    budget = -(-total // n_shards)
    groups: list[list[str]] = [[]]
    size = 0
    for key in shapes:
        if groups[-1] and size + nbytes[key] > budget and len(groups) < n_shards:
            groups.append([])
            size = 0
        groups[-1].append(key)
        size += nbytes[key]
    weight_map = {}
    for i, keys in enumerate(groups, start=1):
        name = f'model-{i:05d}-of-{len(groups):05d}.safetensors'
        tensors = {k: _random_value(k, shapes[k], device, seed, dtype).cpu() for k in keys}
        save_file(tensors, str(directory / name), metadata={'format': 'pt'})
        del tensors
        weight_map.update({k: name for k in keys})
    index = {'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))}
    (directory / SAFETENSORS_INDEX_FILE).write_bytes(_json_bytes(index))
    logger.info('wrote a random checkpoint of %.2f GB to %s', total / 1e9, directory)
    return directory
