package consumer

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/nats-io/nats.go"
)

// batchReader answers state lookups of many commands with one request:
// a JetStream batched direct get ("multi_last") of their keys. Every
// command needs a lookup before its call; asked one by one they cost as
// much server and client work as the rest of the command together, which
// the reliability budget (80% of the throughput without the state bucket)
// does not allow. While one batch is on the wire the next one gathers, so
// batches grow with load and cost nothing extra when idle.
type batchReader struct {
	nc     *nats.Conn
	api    string // $JS.API.DIRECT.GET.<stream>
	prefix string // $KV.<bucket>.
	inbox  string
	sub    *nats.Subscription
	msgs   chan *nats.Msg
	reqs   chan *lookupReq
	seq    uint64
	stop   chan struct{}
	done   sync.WaitGroup

	afterRequest func() // a test's hook, run once a batch's request is sent
}

type lookupReq struct {
	keys []string
	then func([]*stateRecord, error)
}

// maxBatchKeys bounds the lookups in one batch. A lookup reads at most
// two keys, so a batch stays below the server's limit of 1,024 answers
// per request.
const maxBatchKeys = 256

// batchTimeout bounds one batched lookup; on expiry every command in it is
// returned undecided, as with any unavailable state bucket.
const batchTimeout = 5 * time.Second

func newBatchReader(nc *nats.Conn, bucket string) (*batchReader, error) {
	b := &batchReader{
		nc:     nc,
		api:    "$JS.API.DIRECT.GET.KV_" + bucket,
		prefix: "$KV." + bucket + ".",
		inbox:  nc.NewRespInbox(),
		msgs:   make(chan *nats.Msg, 4*maxBatchKeys),
		reqs:   make(chan *lookupReq, 4*maxBatchKeys),
		stop:   make(chan struct{}),
	}
	sub, err := nc.ChanSubscribe(b.inbox+".*", b.msgs)
	if err != nil {
		return nil, fmt.Errorf("state lookups: %w", err)
	}
	b.sub = sub
	b.done.Add(1)
	go b.run()
	return b, nil
}

// close stops the reader once no lookup is pending.
func (b *batchReader) close() {
	close(b.stop)
	b.done.Wait()
	_ = b.sub.Unsubscribe()
}

// lookupThen reads keys through the next batch and answers them in the
// same order; then runs on the reader's goroutine and must not block.
func (b *batchReader) lookupThen(keys []string, then func([]*stateRecord, error)) {
	select {
	case b.reqs <- &lookupReq{keys: keys, then: then}:
	case <-b.stop:
		then(nil, errors.New("state lookups stopped"))
	}
}

// lookup reads one key through the next batch and waits for it.
func (b *batchReader) lookup(ctx context.Context, key string) (*stateRecord, error) {
	type result struct {
		recs []*stateRecord
		err  error
	}
	res := make(chan result, 1)
	b.lookupThen([]string{key}, func(recs []*stateRecord, err error) { res <- result{recs, err} })
	select {
	case r := <-res:
		if r.err != nil {
			return nil, r.err
		}
		return r.recs[0], nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

func (b *batchReader) run() {
	defer b.done.Done()
	batch := make([]*lookupReq, 0, maxBatchKeys)
	for {
		batch = batch[:0]
		select {
		case r := <-b.reqs:
			batch = append(batch, r)
		case <-b.stop:
			return
		}
	gather:
		for len(batch) < maxBatchKeys {
			select {
			case r := <-b.reqs:
				batch = append(batch, r)
			default:
				break gather
			}
		}
		b.answer(batch)
	}
}

func (b *batchReader) answer(batch []*lookupReq) {
	found, err := b.fetch(batch)
	for _, r := range batch {
		if err != nil {
			r.then(nil, err)
			continue
		}
		recs := make([]*stateRecord, len(r.keys))
		backing := make([]stateRecord, len(r.keys)) // one allocation for all
		for i, key := range r.keys {
			rec := &backing[i]
			rec.key = key
			if f, ok := found[key]; ok {
				rec.rev = f.rev
				// Each command gets its own copy: two commands for one
				// instance in one batch must not share a document.
				_ = json.Unmarshal(f.raw, &rec.doc)
				rec.doc.dropNull()
			}
			recs[i] = rec
		}
		r.then(recs, nil)
	}
}

type rawEntry struct {
	rev uint64
	raw []byte
}

func (b *batchReader) fetch(batch []*lookupReq) (map[string]rawEntry, error) {
	// Most lookups find nothing (a first delivery of a new command).
	var found map[string]rawEntry
	subjects := make([]string, 0, 2*len(batch))
	seen := make(map[string]bool, 2*len(batch))
	for _, r := range batch {
		for _, key := range r.keys {
			if !seen[key] {
				seen[key] = true
				subjects = append(subjects, b.prefix+key)
			}
		}
	}
	req := multiLastRequest(subjects)
	b.seq++
	reply := b.inbox + "." + strconv.FormatUint(b.seq, 10)
	// An answer nats.go dropped (the channel full of late answers to a
	// batch that timed out) would read as a key that does not exist:
	// a decided command called again. A batch that lost any is failed.
	dropped, _ := b.sub.Dropped()
	complete := func() (map[string]rawEntry, error) {
		if d, _ := b.sub.Dropped(); d != dropped {
			return nil, errors.New("read state: answers were dropped (slow consumer)")
		}
		return found, nil
	}
	if err := b.nc.PublishRequest(b.api, reply, req); err != nil {
		return nil, fmt.Errorf("read state: %w", err)
	}
	if b.afterRequest != nil {
		b.afterRequest()
	}
	timer := time.NewTimer(batchTimeout)
	defer timer.Stop()
	for {
		select {
		case m := <-b.msgs:
			if m.Subject != reply {
				continue // a late answer to a batch that timed out
			}
			switch status := m.Header.Get("Status"); status {
			case "":
			case "404":
				// "No Results": none of the keys exists. Anything else
				// ("Message Not Found": a message the server could not
				// load) says nothing of the keys.
				if d := m.Header.Get("Description"); d != "No Results" {
					return nil, fmt.Errorf("read state: status 404 %s", d)
				}
				return complete()
			case "204": // end of batch
				// The server stops at its byte limit and says how many
				// answers it did not send: those keys are not absent.
				if np := m.Header.Get("Nats-Num-Pending"); np != "" && np != "0" {
					return nil, fmt.Errorf("read state: the server cut the batch short, %s answers not sent", np)
				}
				return complete()
			default:
				return nil, fmt.Errorf("read state: status %s %s", status, m.Header.Get("Description"))
			}
			subj := m.Header.Get("Nats-Subject")
			rev, err := strconv.ParseUint(m.Header.Get("Nats-Sequence"), 10, 64)
			if err != nil || !strings.HasPrefix(subj, b.prefix) {
				return nil, errors.New("read state: malformed batched answer")
			}
			if found == nil {
				found = make(map[string]rawEntry, len(subjects))
			}
			found[subj[len(b.prefix):]] = rawEntry{rev: rev, raw: m.Data}
		case <-timer.C:
			return nil, errors.New("read state: no answer within " + batchTimeout.String())
		}
	}
}
