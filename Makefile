# Two commands set up everything on a fresh machine with Python 3.11:
#   make demo   - segment micro-world scenes and the bundled sample photo with the micro models (output/demo/)
#   make test   - run the test-suite (656 tests, about 12-13 min on 2 idle cores; make test-fast: the 613 not marked slow, about 3.5 min)
# Both create (or reuse) the virtual environment .venv/ in the checkout and install into it:
# torch + torchvision (the registry's standard builds), detectron2 (tools/install_detectron2.py,
# which keeps one that is already installed) and diffseg_d2 itself in editable mode.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.diffseg_d2-installed
DEMO_CONFIG ?= configs/micro/diffsegmenter.yaml
DEMO_VOCAB ?= circle,square,triangle,cross
PYTEST_ARGS ?=

.PHONY: install demo test test-fast benchmark clean-venv

install: $(STAMP)

$(STAMP): setup.py tools/install_detectron2.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade "pip>=23"
	$(PY) -m pip install "torch>=2.6" "torchvision>=0.21"
	$(PY) tools/install_detectron2.py
	$(PY) -m pip install -e ".[freeda,test,benchmark,web]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) tools/make_microworld.py --splits --export-scenes output/demo/scenes --export-scale 4 --sheet-scenes 4
	$(PY) tools/demo.py --config-file $(DEMO_CONFIG) --vocab "$(DEMO_VOCAB)" --output output/demo \
		--input output/demo/scenes "$$($(PY) -c 'from diffseg_d2.data.datasets.register_sample import sample_image_path; print(sample_image_path())')"
	$(PY) tools/make_microworld.py --splits --describe output/demo --vocab "background,$(DEMO_VOCAB)"
	@echo "Overlays (image | labels with class names) and label PNGs are in output/demo/."
	@echo "The models are the micro-world's: trained by this project on CPU on 64 px scenes of coloured shapes"
	@echo "(README, Micro-world). They know circles, squares, triangles and crosses, nothing else: on the photo"
	@echo "their labels mean nothing. Real results need Stable Diffusion weights (README, Weights)."

test: $(STAMP)
	$(PY) -m pytest tests $(PYTEST_ARGS)

# The tests not marked slow (the end-to-end ones start processes, train or drive a browser).
test-fast: $(STAMP)
	$(PY) -m pytest tests -m "not slow" $(PYTEST_ARGS)

# Every preset by default: hours on a CPU (sd15 alone took 33 min here); PRESET=tiny (seconds), sd15, ... picks one.
benchmark: $(STAMP)
	@$(if $(PRESET),,echo "make benchmark: every preset of tools/benchmark.py; on a CPU this runs for hours (the full-size presets). make benchmark PRESET=tiny runs one.")
	$(PY) tools/benchmark.py $(if $(PRESET),--preset $(PRESET),)

clean-venv:
	rm -rf $(VENV)
