# cls-ray on Ray 2.60.0 / Python 3.11: the image the k8s/ manifests run (head, GPU workers, RayJob submitter).
#
#   docker build -t cls-ray:0.1.0 .            # from the repository root
#   docker tag cls-ray:0.1.0 REGISTRY/cls-ray:0.1.0 && docker push REGISTRY/cls-ray:0.1.0
#
# The base is Ray's own image (user `ray`, Python 3.11 in /home/ray/anaconda3, Ray 2.60.0), the layout KubeRay
# expects. It serves CPU and GPU pods alike: torch's wheels carry their CUDA 13 libraries, and on a GPU node the
# NVIDIA container toolkit adds the driver (580 or newer).
FROM rayproject/ray:2.60.0-py311

# KubeRay's default health probes run wget; S3 over TLS needs the CA bundle; FFCV (data.format=ffcv) builds from
# source against OpenCV and libjpeg-turbo.
USER root
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates wget \
       build-essential pkg-config libopencv-dev libturbojpeg0-dev \
    && rm -rf /var/lib/apt/lists/*
USER ray

WORKDIR /home/ray/cls-ray
COPY --chown=ray:users pyproject.toml constraints.txt README.md ./
COPY --chown=ray:users cls_ray ./cls_ray
# Every dependency pinned to the versions the project is tested with.
RUN pip install --no-cache-dir -c constraints.txt '.[ffcv]' \
    && cls-ray --help > /dev/null
# Search spaces are read by path (tune.space: /home/ray/cls-ray/search_spaces/...); configs reach the pods
# through a ConfigMap or S3.
COPY --chown=ray:users search_spaces ./search_spaces

ENV PYTHONUNBUFFERED=1
