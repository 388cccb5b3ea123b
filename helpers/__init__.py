"""The helpers at the bottom of the layers: atomic files and strict JSON, downloads, the run lock,
the runtime (seeds, devices, precision), terminal and log output, and the preprocessing facts.
They import nothing of ours above them."""
