"""Dataset contract, synthetic city, keypoints, splits/pairs and the LightningDataModule."""

from siamese_retrieval.data.dataset import DatasetFiles, RetrievalDataset, read_dataset, write_dataset

__all__ = ["DatasetFiles", "RetrievalDataset", "read_dataset", "write_dataset"]
