package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"

	"github.com/nats-io/nats.go"
)

// leaderReader reads keys from the bucket stream's leader, through the
// JetStream API's message get rather than a direct get. Any replica may
// answer a direct get, and a follower may not have applied the last
// writes yet; the leader has every write it acknowledged. The worker
// reads this way only where a stale answer costs a wrong outcome: the
// re-read after a DLF.6205 (stoppedMeanwhile), which a stop recorded a
// moment ago must explain. That is one request per key, in sequence: a
// flood of commands for one instance makes a few hundred, rare enough
// not to batch them. Caveat: a leader cut off from its quorum answers
// until it notices, perhaps from behind the new leader; only then is
// this read stale, and the sibling note (see siblings) covers a stop
// this worker saw for as long as its record is not stored.
type leaderReader struct {
	nc     *nats.Conn
	api    string // $JS.API.STREAM.MSG.GET.<stream>
	prefix string // $KV.<bucket>.
}

func newLeaderReader(nc *nats.Conn, bucket string) *leaderReader {
	return &leaderReader{nc: nc, api: "$JS.API.STREAM.MSG.GET.KV_" + bucket, prefix: "$KV." + bucket + "."}
}

// jsNoMessageFound is JetStream's error code for a message get that found
// nothing.
const jsNoMessageFound = 10037

// read returns the documents of keys, in order; a missing key is an empty
// document.
func (l *leaderReader) read(ctx context.Context, keys []string) ([]*stateRecord, error) {
	recs := make([]*stateRecord, len(keys))
	for i, key := range keys {
		r, err := l.readOne(ctx, key)
		if err != nil {
			return nil, err
		}
		recs[i] = r
	}
	return recs, nil
}

func (l *leaderReader) readOne(ctx context.Context, key string) (*stateRecord, error) {
	req, err := json.Marshal(struct {
		LastBySubject string `json:"last_by_subj"`
	}{l.prefix + key})
	if err != nil {
		return nil, fmt.Errorf("read state %s: %w", key, err)
	}
	m, err := l.nc.RequestWithContext(ctx, l.api, req)
	if err != nil {
		return nil, fmt.Errorf("read state %s: %w", key, err)
	}
	var resp struct {
		Message *struct {
			Seq  uint64 `json:"seq"`
			Data []byte `json:"data"` // base64 in the answer
		} `json:"message"`
		Error *struct {
			ErrCode     int    `json:"err_code"`
			Description string `json:"description"`
		} `json:"error"`
	}
	if err := json.Unmarshal(m.Data, &resp); err != nil {
		return nil, fmt.Errorf("read state %s: unreadable answer: %w", key, err)
	}
	r := &stateRecord{key: key}
	switch {
	case resp.Error != nil && resp.Error.ErrCode == jsNoMessageFound:
		return r, nil
	case resp.Error != nil:
		return nil, fmt.Errorf("read state %s: %s (%d)", key, resp.Error.Description, resp.Error.ErrCode)
	case resp.Message == nil || resp.Message.Seq == 0:
		return nil, errors.New("read state " + key + ": answer without a message")
	}
	// As in the batched reader: a delete marker or an unreadable document
	// is an empty one at that revision, which the next write replaces.
	r.rev = resp.Message.Seq
	_ = json.Unmarshal(resp.Message.Data, &r.doc)
	r.doc.dropNull()
	return r, nil
}
