# The ext_proc server only: no Envoy, no demo or render extras.
# Build: docker build -t extproc-doctor:0.1.0 .   Run: see deploy/k8s/deployment.yaml.
# tests/deploy/test_image_install.py repeats these steps in a fresh virtual environment.

FROM python:3.12-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY pyproject.toml README.md /src/
COPY extproc /src/extproc
RUN python -m venv /opt/extproc && /opt/extproc/bin/pip install /src

FROM python:3.12-slim
# The same path as in the build stage: a virtual environment's scripts name it.
COPY --from=build /opt/extproc /opt/extproc
# Nothing writes to the (read-only) root filesystem: no bytecode caches.
ENV PATH=/opt/extproc/bin:$PATH PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
USER 10001:10001
EXPOSE 50051
ENTRYPOINT ["extproc"]
CMD ["serve", "--listen", "0.0.0.0:50051"]
