# Hedwig SMTP relay.  Build: docker build -t hedwig .
# Run:   docker run -d --name hedwig --stop-timeout 30 -p 25:2525 -v hedwig-spool:/var/lib/hedwig hedwig
# The config is /etc/hedwig/hedwig.toml (conf/docker.toml); mount your own over it.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HEDWIG_CONFIG=/etc/hedwig/hedwig.toml

WORKDIR /src
# Dependencies first, so a code change does not reinstall them.
COPY requirements.txt ./
RUN pip install -r requirements.txt
COPY setup.py README.md hedwig.py ./
COPY hedwig ./hedwig
RUN pip install --no-deps . && rm -rf /src

# A fixed uid/gid, so a bind-mounted spool can be chown'ed to it (10025:10025).
RUN groupadd --system --gid 10025 hedwig \
 && useradd --system --uid 10025 --gid hedwig --home-dir /var/lib/hedwig \
            --shell /usr/sbin/nologin hedwig \
 && install -d -o hedwig -g hedwig -m 0700 /var/lib/hedwig
COPY conf/docker.toml /etc/hedwig/hedwig.toml

USER hedwig
WORKDIR /var/lib/hedwig
VOLUME ["/var/lib/hedwig"]
# SMTP (map host port 25 to it: -p 25:2525), metrics, health.
EXPOSE 2525 9090 9091

HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9091/healthz', timeout=4)"]

# The master runs in the foreground as PID 1; on SIGTERM it stops accepting and lets
# sessions and deliveries finish within the grace period (give docker stop 30 s).
STOPSIGNAL SIGTERM
ENTRYPOINT ["hedwig"]
CMD ["serve"]
