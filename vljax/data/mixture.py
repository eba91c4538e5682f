"""Weighted mixtures of sources: 'W1*SPEC1|W2*SPEC2|...' in config.data.train."""
from __future__ import annotations

from typing import Any, Sequence

from vljax.configlib import ConfigError


class Mixture:
  """Several random-access sources drawn from in proportion to their weights.

  The pipeline shuffles and repeats each component on its own and interleaves
  them deterministically (`grain.MapDataset.mix`), so a mixture is endless and
  its position is one integer: resume is exact.
  """

  def __init__(self, components: Sequence[Any], weights: Sequence[float],
               names: Sequence[str] | None = None):
    if not components or len(components) != len(weights):
      raise ValueError('A mixture needs one weight per component source.')
    if any(w <= 0 for w in weights):
      raise ValueError(f'Mixture weights must be positive, got {list(weights)}.')
    total = float(sum(weights))
    self.components = list(components)
    self.weights = [float(w) / total for w in weights]
    self.names = list(names) if names else [repr(c) for c in components]

  def __len__(self) -> int:
    # The size of "one epoch" (for total_epochs and friends): every component once.
    return sum(len(c) for c in self.components)

  def __repr__(self) -> str:
    parts = ', '.join(f'{w:.3g}*{n}' for w, n in zip(self.weights, self.names))
    return f'Mixture({parts})'


def split_spec(spec: str) -> list[tuple[float, str]]:
  """'0.7*webdataset:/a/{0..9}.tar|0.3*jsonl:/b.jsonl' -> [(0.7, ...), (0.3, ...)].

  A part without 'W*' has weight 1. Each part keeps its own `?options`
  (vljax.data.sources.parse_spec reads them).

  Raises:
    ConfigError: an empty part or a weight that is not positive.
  """
  out = []
  for part in spec.split('|'):
    part = part.strip()
    weight, star, rest = part.partition('*')
    try:
      # A '*' that is a glob wildcard ('webdataset:/d/*.tar') is no weight.
      out.append((float(weight), rest.strip()) if star else (1.0, part))
    except ValueError:
      out.append((1.0, part))
    if not out[-1][1]:
      raise ConfigError(f'Mixture {spec!r} has an empty part; write W1*SPEC1|W2*SPEC2.')
    if not out[-1][0] > 0:
      raise ConfigError(f'Mixture {spec!r}: weight {out[-1][0]} of {out[-1][1]!r} must be '
                        f'positive.')
  return out
