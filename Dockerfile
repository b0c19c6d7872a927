# The image the Helm chart runs by default (repository whatsapp-session-sidecar, tag = the chart's appVersion):
#   docker build -t whatsapp-session-sidecar:0.1.0 .
# Multi-stage: the build stage compiles nothing the runtime keeps; the final stage holds a venv and runs as an
# unprivileged user (UID 10001, matching the chart's securityContext) on a read-only root filesystem, writing
# only to the chart's mounts (/var/lib/wa-sidecar, /tmp).
# Any Debian-based Python 3.11 works as PYTHON_IMAGE: the test suite builds from a bookworm root filesystem made
# by Debian's mmdebstrap and imported into buildah, with no registry (docs/quickstart/kubernetes.md, "Container image").
ARG PYTHON_IMAGE=python:3.11.7-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY requirements/image.txt ./requirements/
COPY sidecar ./sidecar
# Exact versions from the lockfile (requirements/image.txt: the runtime and the otlp extra), then the sidecar itself
# without resolving anything; pip check fails the build if the lock misses a dependency.
RUN python3 -m venv /opt/wa-sidecar \
    && /opt/wa-sidecar/bin/pip install --no-deps -r requirements/image.txt \
    && /opt/wa-sidecar/bin/pip install --no-deps . \
    && /opt/wa-sidecar/bin/pip check \
    && /opt/wa-sidecar/bin/pip uninstall --yes pip setuptools

FROM ${PYTHON_IMAGE}
RUN groupadd --gid 10001 sidecar \
    && useradd --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar \
    && mkdir -p /var/lib/wa-sidecar && chown 10001:10001 /var/lib/wa-sidecar
COPY --from=build /opt/wa-sidecar /opt/wa-sidecar
ENV PATH=/opt/wa-sidecar/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    WA_SIDECAR_LISTEN=0.0.0.0:9464
USER 10001:10001
EXPOSE 9464
ENTRYPOINT ["wa-sidecar"]
CMD ["serve"]
