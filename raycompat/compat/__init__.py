"""The NIFCL core: pseudo classifiers, the kNN graph, the random walk and the losses.

Pure torch/numpy/scipy/faiss; nothing here imports Ray. Import the submodules
directly (``raycompat.compat.random_walk``, ``raycompat.compat.losses``): this
package does not re-export them, so that importing the losses does not pull in faiss.
"""
