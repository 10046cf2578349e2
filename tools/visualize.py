"""Pictures of which patches merged, after chosen blocks, like Figure 1 of the ATM paper.

Each row is one image: the original, then the image painted by merged group (mean colour, group
outlines) after each chosen block, labelled with the tokens left. With ATM, simple images collapse
into few large groups while cluttered ones keep many tokens. Images run one at a time, so with
``batch_rule=min`` each picture shows the image on its own (batch size 1).

Example (ViT-Ti weights, an ImageNet val folder):
    python tools/visualize.py --weights vit_tiny_patch16_224.safetensors --images IMAGENET/val \\
        --max-images 6 --layers 3 6 9 12 --method configs/vit_t_atm.yaml --output merged.png
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import ImageDraw
from torch import Tensor, nn
from torchvision.transforms.functional import to_pil_image, to_tensor
from torchvision.utils import make_grid, save_image

from atm_lightning import TokenMerger, merge_stats, patch
from atm_lightning.data.images import evenly_spaced, image_paths, load_images, unnormalize
from atm_lightning.evaluation.options import (
    METHOD_HELP,
    HelpFormatter,
    Method,
    add_model_args,
    load_model,
    parse_method,
    run_cli,
    weights_label,
)
from atm_lightning.vis import paint_merged_groups

PADDING = 2


@dataclass(frozen=True)
class Picture:
    """One image's row of the grid and the tokens left after each chosen block."""

    path: Path
    tiles: Tensor  # [1 + len(layers), 3, H, W] in [0, 1]: original, then one per chosen block
    tokens: dict[int, int]  # block (1-indexed; 0 = input) -> tokens, class token included


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python tools/visualize.py", description=__doc__, formatter_class=HelpFormatter
    )
    add_model_args(parser)
    parser.add_argument(
        "--images",
        type=Path,
        nargs="+",
        required=True,
        metavar="PATH",
        help="image files and/or folders (searched recursively)",
    )
    parser.add_argument(
        "--max-images",
        type=int,
        default=8,
        metavar="N",
        help="at most this many images, evenly spaced over the sorted list",
    )
    parser.add_argument("--method", required=True, help=f"merging method: {METHOD_HELP}")
    parser.add_argument(
        "--layers",
        type=int,
        nargs="+",
        default=[3, 6, 9, 12],
        metavar="L",
        help="blocks (1-indexed) after which to paint",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("merged_groups.png"),
        metavar="PNG",
        help="PNG grid; token counts go beside it as .json",
    )
    return parser


def main(args: argparse.Namespace) -> list[Picture]:
    if args.max_images < 1:
        raise ValueError(f"--max-images must be >= 1, got {args.max_images}")
    if args.output.suffix.lower() != ".png":
        raise ValueError(f"--output {args.output} must end in .png")
    paths = image_paths(args.images)
    paths = evenly_spaced(paths, min(args.max_images, len(paths)))
    method = parse_method(args.method)
    model = load_model(args, torch.device("cpu"))
    check_layers(args.layers, len(model.blocks))
    images, config = load_images(paths, args.model)
    patch(model, tracing(method))
    pictures = [picture(model, path, image, config, args.layers) for path, image in zip(paths, images)]
    save_grid(pictures, args.output)
    json_path = args.output.with_suffix(".json")
    write_counts(pictures, json_path, args, method)
    print(counts_table(pictures, args.layers))
    print(f"\nwrote {args.output} and {json_path}")
    return pictures


def check_layers(layers: list[int], depth: int) -> None:
    bad = [layer for layer in layers if not 1 <= layer <= depth]
    if bad:
        raise ValueError(f"--layers {bad} are not blocks of this model; use block numbers 1..{depth}")


def tracing(method: Method) -> TokenMerger:
    """The method's merger, recording which patches each token holds."""
    return dataclasses.replace(method.merger, trace_source=True)


def picture(model: nn.Module, path: Path, image: Tensor, config: dict, layers: list[int]) -> Picture:
    """Run one image and paint its merged groups after each of ``layers``."""
    with torch.inference_mode():
        model(image[None])
    stats = merge_stats(model)
    original = unnormalize(image[None], config)
    tokens = {0: int(stats.tokens[0, 0])} | {layer: int(stats.tokens[0, layer]) for layer in layers}
    tiles = [original[0]]
    for layer in layers:
        painted = paint_merged_groups(
            original,
            stats.sources[layer - 1].float(),
            model.patch_embed.patch_size[0],
            model.num_prefix_tokens,
        )
        tiles.append(label_tile(painted[0], f"block {layer}: {tokens[layer]} tokens"))
    return Picture(path, torch.stack(tiles), tokens)


def label_tile(tile: Tensor, text: str) -> Tensor:
    """Write ``text`` in the top-left corner on a dark box, so the grid reads without the JSON."""
    image = to_pil_image(tile)
    draw = ImageDraw.Draw(image)
    _, _, right, bottom = draw.textbbox((3, 2), text)
    draw.rectangle((0, 0, right + 3, bottom + 2), fill=(0, 0, 0))
    draw.text((3, 2), text, fill=(255, 255, 255))
    return to_tensor(image)


def save_grid(pictures: list[Picture], path: Path) -> None:
    """One row per image: the original, then one tile per chosen block."""
    tiles = torch.cat([p.tiles for p in pictures])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(make_grid(tiles, nrow=len(pictures[0].tiles), padding=PADDING, pad_value=1.0), path)


def write_counts(pictures: list[Picture], path: Path, args: argparse.Namespace, method: Method) -> None:
    record = {
        "model": args.model,
        "weights": weights_label(args),
        "method": method.label,
        "merger": method.merger.params(),
        "layers": args.layers,
        "tokens_note": "tokens after each block (key 0: input), class token included, as merge_stats.tokens",
        "images": [{"path": str(p.path), "tokens": p.tokens} for p in pictures],
    }
    path.write_text(json.dumps(record, indent=2) + "\n")


def counts_table(pictures: list[Picture], layers: list[int]) -> str:
    """Tokens per image (class token included) as a markdown table."""
    lines = [
        "| image | input | " + " | ".join(f"after block {layer}" for layer in layers) + " |",
        "|---|" + "---:|" * (1 + len(layers)),
    ]
    for p in pictures:
        counts = " | ".join(str(p.tokens[layer]) for layer in layers)
        lines.append(f"| {p.path.name} | {p.tokens[0]} | {counts} |")
    return "\n".join(lines)


if __name__ == "__main__":
    run_cli(build_parser(), main)
