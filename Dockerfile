# The roomshard image: the directory, the shard and the rules reconciler (`roomshard
# directory|shard|rules ...`), as infra/kubernetes/ runs them. Build: docker build -t roomshard:0.1.0 .
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY roomshard roomshard
COPY directory directory
COPY shard shard
COPY router_rules router_rules
RUN pip install --no-cache-dir --prefix=/install .

# kubectl, for the reconciler's --reload-cmd (infra/kubernetes/rules.yaml), checked against
# the release's published SHA-256.
FROM python:3.11-slim AS kubectl
ARG KUBECTL_VERSION=v1.31.4
ARG TARGETARCH=amd64
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl /kubectl
ADD https://dl.k8s.io/release/${KUBECTL_VERSION}/bin/linux/${TARGETARCH}/kubectl.sha256 /kubectl.sha256
RUN echo "$(cat /kubectl.sha256)  /kubectl" | sha256sum -c - && chmod 0755 /kubectl

FROM python:3.11-slim
COPY --from=build /install /usr/local
COPY --from=kubectl /kubectl /usr/local/bin/kubectl
# A fixed non-root user (the manifests' runAsUser); the root file system can stay read-only.
RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin roomshard
USER 10001
ENV PYTHONUNBUFFERED=1
ENTRYPOINT ["roomshard"]
