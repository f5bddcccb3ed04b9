# make demo: set up .venv, make Fashion-MNIST available offline, train vae.py (default preset) and print its test NLL.
# make test: the same set-up, then the test suite.
PY := .venv/bin/python
FASHION := /usr/share/datasets/fashion-mnist

.PHONY: demo test setup data

demo: setup data
	$(PY) vae.py

test: setup data
	$(PY) -m pytest -q tests

setup: .venv/.installed

.venv/.installed: requirements.txt
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q -r requirements.txt
	touch $@

# Debian/Ubuntu as root: the real Fashion-MNIST from the package dataset-fashion-mnist (no download).
# Elsewhere common.py downloads it through torchvision on first use; the tests never need it.
data:
	@if [ -f $(FASHION)/train-images-idx3-ubyte.gz ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null 2>&1 \
	  || echo "note: apt-get install dataset-fashion-mnist failed; Fashion-MNIST will be downloaded on first use"; \
	else echo "note: not root on Debian/Ubuntu; Fashion-MNIST will be downloaded on first use"; fi
