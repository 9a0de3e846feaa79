"""One archive, many workers: a big request cut into segments that any worker on the source queue builds.

The worker that receives the request is its coordinator. It HEADs every source and checks the request
as a single worker does, then plans the archive: contiguous runs of entries of about
FANOUT_SEGMENT_BYTES source bytes (segments), each with its own range of part numbers, and creates the
multipart upload. The plan (the part table) goes to the destination bucket next to status.json, under
`<prefix>/<request_id>/fanout/`: `plan.json`, each segment's entries, and, as segments are built, each
one's record (its parts' ETags, length, central directory). Then it sends one segment task per segment
to the source queue, so autoscaling on that queue's backlog scales for them too, and builds segments
itself while it waits. Once every segment is recorded it joins the segments' ends, writes the central
directory, completes the upload and lets the worker notify once and delete the request.

A segment task names only the request and the segment: everything else is read from the plan a worker
wrote, so a forged or repeated task can at most rebuild a segment the same way (same bytes, same part
numbers: re-uploading a part replaces it). A redelivered request finds the plan and resumes it, with the
same upload; it never starts a second one.

The bytes are those a single worker writes: a ZIP local header holds no offset, so a segment's entries do
not depend on where it lands, except that an entry starting past 4 GiB is written with zip64 fields. So
each segment is placed from bounds of what comes before it: entirely below 4 GiB whatever the earlier
entries compress to, or entirely past it; a segment that may straddle it is `chained` and built (by the
coordinator) only once the segments before it are done and its exact offset known.

The layer, from the top: `coordinator` (the receiving worker's steps), `planning` (HEADs, layout, upload,
plan written), `tasks` (segment task messages, and a worker's run of one), `building` (one segment from
the plan into the upload, its record written), `joining` (segments joined, directory placed, upload
completed), `segment` (one segment's zip stream, its ends and directory set apart), `claims`, `store`
(the plan's documents in S3), `layout` (segments, part numbers, placement) and `directory` (central
directory records moved into place).
"""
