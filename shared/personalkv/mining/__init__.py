"""Evidence mining: each concept's distinct patches, its profile, and a visual recognizer.

  features    pluggable extractors (RootSIFT local features, colour windows; CLIP / SigLIP /
              VLM vision tower plug in by registering a PatchEmbedder)
  proposals   candidate boxes at several scales, NMS
  saliency    subject prior (weights-free spectral residual; detectors plug in)
  library     one user's photos + negative pool, keypoint index, the matching rule
  scoring     per-window evidence: subject, consistency, distinctiveness, relevance
  miner       top-k patches per concept -> manifest PatchRecords
  recognizer  which concept (or none) a photo shows; usable as the retriever's re-ranker
  profile     schema-validated concept profiles from user facts and the VLM's description
  sheets      contact-sheet PNGs
  descriptors per-photo descriptors stored beside the photo (described once per photo)
  served      each user's recognizer in the answering process (Ask's photo re-ranker)
  output      MiningOutput / PhotoRef: the service miner's seam (no heavy imports)
  incremental mining one concept's new photos for the service (mine_for_service)
  registry    extractors, patch embedders and subject priors by name
(`personalkv mine` and `personalkv eval recognition` live in personalkv.evaluation.cli.)
"""

from personalkv.mining.output import MiningOutput, PhotoRef


def mine_for_service(manifest, photos, **options):
    """See personalkv.mining.incremental (imported lazily: OpenCV and torch load only when mining runs)."""
    from personalkv.mining.incremental import mine_for_service as run

    return run(manifest, photos, **options)
