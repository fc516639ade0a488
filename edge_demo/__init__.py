"""Demo data and demo model: synthetic product photos and a small classifier trained from scratch.

No pretrained weights or hub data sets can be downloaded where this project is built, so the project
makes its own: `edge_demo.synthetic` draws shop products, `edge_demo.train` trains a MobileNet-style
classifier on them and exports a SavedModel.
"""
