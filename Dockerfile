# One image for GPU training and its sync: CUDA PyTorch, ultralytics and asyncsync.
#
#   docker build -t asyncsync-train .
#   docker run --gpus all --ipc=host -e AWS_ACCESS_KEY_ID -e AWS_SECRET_ACCESS_KEY \
#     -v "$PWD/runs:/workspace/runs" asyncsync-train \
#     run /workspace/runs s3://bucket/prefix -- yolo detect train data=coco8.yaml model=yolov8n.pt
#
# ultralytics writes to <WORKDIR>/runs/<task>/<name> unless project= says otherwise, so DIR
# is /workspace/runs. As a sidecar next to a training container sharing that volume:
#   docker run asyncsync-train watch /workspace/runs s3://bucket/prefix --metrics-addr :9100
FROM pytorch/pytorch:2.4.1-cuda12.4-cudnn9-runtime

# OpenCV (pulled in by ultralytics) needs libGL and glib; tini is PID 1 so that SIGTERM
# reaches asyncsync, which forwards it to the training and flushes before exiting.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 libglib2.0-0 tini \
    && rm -rf /var/lib/apt/lists/*

# The CUDA build of torch comes with the base image; only ultralytics is added on top.
RUN pip install --no-cache-dir "ultralytics==8.4.190"

WORKDIR /opt/asyncsync
COPY pyproject.toml README.md ./
COPY src ./src
RUN pip install --no-cache-dir .

RUN useradd --create-home --uid 1000 trainer \
    && mkdir -p /workspace/runs \
    && chown -R 1000:1000 /workspace
USER 1000:1000
WORKDIR /workspace
# Ultralytics keeps its settings here; the default under $HOME works, but this makes it
# explicit and writable for the non-root user.
ENV YOLO_CONFIG_DIR=/home/trainer/.config/Ultralytics \
    PYTHONUNBUFFERED=1

ENTRYPOINT ["/usr/bin/tini", "--", "asyncsync"]
CMD ["--help"]
