"""Hand-off to people: ``wsss export`` writes a labeling or prediction output in an annotation tool's
format (Label Studio, CVAT, COCO results), most doubtful images first; ``wsss import`` turns the
annotators' work back into a pseudo-mask folder that ``wsss train`` reads."""
