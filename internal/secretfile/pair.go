package secretfile

import (
	"context"
	"sync/atomic"

	"go.uber.org/zap"
)

// Pair is an access key and a secret key used together to sign a request.
// Get returns both from one load, so a request is never signed with half
// of a rotation when both come from files watched together (WatchPair).
type Pair struct {
	cur atomic.Pointer[[2]string]
	ver atomic.Uint64

	watching // set by WatchPair only
}

// StaticPair returns a Pair that always holds ak and sk.
func StaticPair(ak, sk string) *Pair {
	p := &Pair{}
	p.set(ak, sk)
	return p
}

// WatchPair is Watch for an access key and a secret key in two files. Both
// are re-read together whenever either changes and published together, so
// a Kubernetes Secret holding both, which is swapped in one step, never
// shows one new key beside one old. (A writer that replaces the two files
// one after the other, further apart than the debounce, still opens a
// short window in which a request is signed with a mismatched pair; DLF
// refuses it with 401, and the worker retries.)
func WatchPair(ctx context.Context, akPath, skPath string, log *zap.Logger, opts ...Option) (*Pair, error) {
	p := &Pair{}
	p.done = make(chan struct{})
	err := watch(ctx, []string{akPath, skPath}, log, opts, func(vals []string) uint64 {
		p.set(vals[0], vals[1])
		return p.Version()
	}, &p.stop, p.done)
	if err != nil {
		return nil, err
	}
	return p, nil
}

// Get returns the current access key and secret key.
func (p *Pair) Get() (ak, sk string) {
	if p == nil {
		return "", ""
	}
	v := p.cur.Load()
	if v == nil {
		return "", ""
	}
	return v[0], v[1]
}

// Version increases by one whenever the pair changes.
func (p *Pair) Version() uint64 {
	if p == nil {
		return 0
	}
	return p.ver.Load()
}

// Close stops watching and waits for the watching goroutine; on a static
// pair it does nothing.
func (p *Pair) Close() {
	if p != nil {
		p.close()
	}
}

// String returns a redacted form so that a Pair never prints its keys.
func (p *Pair) String() string { return "secretfile.Pair(redacted)" }

// GoString returns a redacted form for %#v.
func (p *Pair) GoString() string { return "secretfile.Pair(redacted)" }

func (p *Pair) set(ak, sk string) {
	p.cur.Store(&[2]string{ak, sk})
	p.ver.Add(1)
}
