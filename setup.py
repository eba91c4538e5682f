"""vljax: vision-language pretraining in JAX/Flax."""
import setuptools

setuptools.setup(
    name="vljax",
    version="0.1.0",
    description="Vision-language pretraining (SigLIP, CLIP, ...) in JAX/Flax over a device mesh.",
    python_requires=">=3.11",
    packages=setuptools.find_packages(include=["vljax", "vljax.*"]),
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.8",
        "grain>=0.2.18",
        "ml-collections>=1.1.0",
        "absl-py",
        "sentencepiece>=0.2.0",
        # CLIP's BPE tokenizer cleans texts with ftfy, as OpenAI's and open_clip's do.
        "ftfy>=6.1",
        # Reads Hugging Face / open_clip .safetensors checkpoints with numpy (vljax.interop).
        "safetensors>=0.4",
        "numpy",
        "pillow",
        "tensorboardX>=2.6",
    ],
    extras_require={
        # TFDS sources (tfds:NAME) read prepared datasets without a TensorFlow runtime.
        "tfds": ["tensorflow-datasets>=4.9"],
        # pycocoevalcap: the COCO caption toolkit the CIDEr-D/BLEU-4 tests compare against.
        "test": ["pytest>=8", "pycocoevalcap>=1.2", "tensorflow-datasets>=4.9"],
    },
)
