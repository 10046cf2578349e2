.PHONY: setup test test-all demo lint

setup:
	bash tools/setup_env.sh

# Lint first: it takes a second and catches what imports alone would not (e.g. a bad __all__).
test: setup
	$(MAKE) lint
	HF_HUB_OFFLINE=1 python -m pytest -q

test-all: setup
	$(MAKE) lint
	HF_HUB_OFFLINE=1 python -m pytest -q -m ""

lint:
	python -m ruff check atm_lightning tests tools

# Offline end to end on scikit-learn digits (a few minutes on 2 CPU cores); writes runs/demo/.
demo: setup
	HF_HUB_OFFLINE=1 python tools/demo.py
