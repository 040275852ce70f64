"""The one compiled part: a cropped JPEG decoder over the system's libjpeg-turbo (see its C source).

Everything else is in pyproject.toml. The extension is optional: where libjpeg's headers are missing
the install still succeeds and the data kernel decodes whole images (imagenet_ray/data/decode.py);
`imagenet-ray bench data` reports which decoder ran, and the test suite requires the extension.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "imagenet_ray_jpeg",
            sources=["imagenet_ray/data/_jpeg_crop.c"],
            libraries=["jpeg"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-clobbered"],
            optional=True,
        )
    ]
)
