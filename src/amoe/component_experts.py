"""Component experts: MLP autoencoders over masked-average-pooled component vectors (paper Eq. 7)."""

from __future__ import annotations

from torch import nn


class ComponentExpert(nn.Module):
    """D -> hidden -> bottleneck -> bottleneck and back to D; dropout in the decoder. (…, D) -> (…, D)."""

    def __init__(self, dim: int = 768, hidden: int = 256, bottleneck: int = 64, dropout: float = 0.1):
        super().__init__()
        self.encoder = nn.Sequential(
            nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, bottleneck), nn.ReLU(), nn.Linear(bottleneck, bottleneck)
        )
        self.decoder = nn.Sequential(
            nn.Dropout(dropout), nn.Linear(bottleneck, bottleneck), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(bottleneck, hidden), nn.ReLU(),
            nn.Dropout(dropout), nn.Linear(hidden, dim),
        )

    def forward(self, x):
        return self.decoder(self.encoder(x))
