package emulator

import (
	"crypto/rand"
	"encoding/hex"
	"hash/maphash"
	"sync"
	"sync/atomic"
)

// Instance statuses. The first four are the ones DLF documents for
// "Querying the Execution Result of a Script Instance"
// (dataartsstudio_02_0101).
const (
	StatusLaunching = "LAUNCHING"
	StatusRunning   = "RUNNING"
	StatusFinished  = "FINISHED"
	StatusFailed    = "FAILED"
	// StatusStopped is what a stopped instance reports. DLF does not
	// document it; we assume FAILED, the only documented status for a run
	// that did not succeed, so clients never meet a value outside the
	// documented enum. Use Stopped to tell a stop from another failure.
	StatusStopped = StatusFailed
)

// instKey identifies an instance. The workspace is an attribute of the
// instance, not part of its identity: DLF instance ids are unique, and a
// request naming the wrong workspace must be refused, not routed elsewhere.
type instKey struct{ project, script, instance string }

// entry is created for an instance or for the first stop call or fault
// override naming one; entries are never removed, so a pointer stays valid
// after the shard lock is released.
type entry struct {
	// guarded by the shard's mu
	exists    bool
	workspace string
	status    string
	stopped   bool // a stop request took effect

	calls  atomic.Int64           // stop requests received
	faults atomic.Pointer[Faults] // nil: use the global faults
}

// shardCount spreads the instance map over independent locks so concurrent
// requests for different instances rarely contend.
const shardCount = 32

type shard struct {
	mu sync.Mutex
	m  map[instKey]*entry
}

type store struct {
	seed   maphash.Seed
	shards [shardCount]shard
}

func (s *store) init() {
	s.seed = maphash.MakeSeed()
	for i := range s.shards {
		s.shards[i].m = make(map[instKey]*entry)
	}
}

func (s *store) shardOf(k instKey) *shard {
	var h maphash.Hash
	h.SetSeed(s.seed)
	h.WriteString(k.project)
	h.WriteByte(0)
	h.WriteString(k.script)
	h.WriteByte(0)
	h.WriteString(k.instance)
	return &s.shards[h.Sum64()%shardCount]
}

func (s *store) get(k instKey) *entry {
	sh := s.shardOf(k)
	sh.mu.Lock()
	e := sh.m[k]
	sh.mu.Unlock()
	return e
}

func (s *store) getOrCreate(k instKey) *entry {
	sh := s.shardOf(k)
	sh.mu.Lock()
	e := sh.m[k]
	if e == nil {
		e = &entry{}
		sh.m[k] = e
	}
	sh.mu.Unlock()
	return e
}

// put creates or resets an instance.
func (s *store) put(k instKey, workspace, status string) {
	sh := s.shardOf(k)
	sh.mu.Lock()
	e := sh.m[k]
	if e == nil {
		e = &entry{}
		sh.m[k] = e
	}
	e.exists, e.workspace, e.status, e.stopped = true, workspace, status, false
	sh.mu.Unlock()
}

// setStatus changes an instance's status, creating it in the default
// workspace if needed.
func (s *store) setStatus(k instKey, status string) {
	sh := s.shardOf(k)
	sh.mu.Lock()
	e := sh.m[k]
	if e == nil {
		e = &entry{}
		sh.m[k] = e
	}
	if !e.exists {
		e.exists, e.workspace = true, ""
	}
	e.status = status
	sh.mu.Unlock()
}

// statusIn returns the status of an instance seen from workspace; ok is false
// when it does not exist there.
func (s *store) statusIn(k instKey, workspace string) (string, bool) {
	sh := s.shardOf(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[k]
	if e == nil || !e.exists || e.workspace != workspace {
		return "", false
	}
	return e.status, true
}

// snapshot returns an instance's status and whether a stop took effect.
func (s *store) snapshot(k instKey) (status string, stopped, ok bool) {
	sh := s.shardOf(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[k]
	if e == nil || !e.exists {
		return "", false, false
	}
	return e.status, e.stopped, true
}

// stop applies a stop request from workspace; it reports whether the
// instance was running (or launching) there and is now stopped.
func (s *store) stop(k instKey, workspace string) bool {
	sh := s.shardOf(k)
	sh.mu.Lock()
	defer sh.mu.Unlock()
	e := sh.m[k]
	if e == nil || !e.exists || e.workspace != workspace ||
		(e.status != StatusRunning && e.status != StatusLaunching) {
		return false
	}
	e.status, e.stopped = StatusStopped, true
	return true
}

// newInstanceID returns a random id shaped like a UUID (lower-case hex and
// dashes), which fits the worker's instance_id rule.
func newInstanceID() string {
	var b [16]byte
	_, _ = rand.Read(b[:]) // never fails (crypto/rand, Go 1.24+)
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	var out [36]byte
	hex.Encode(out[0:8], b[0:4])
	out[8] = '-'
	hex.Encode(out[9:13], b[4:6])
	out[13] = '-'
	hex.Encode(out[14:18], b[6:8])
	out[18] = '-'
	hex.Encode(out[19:23], b[8:10])
	out[23] = '-'
	hex.Encode(out[24:36], b[10:16])
	return string(out[:])
}

// Execute creates a new RUNNING instance of script in project and workspace
// ("" is the default workspace) and returns its id, as the execute API does.
func (e *Emulator) Execute(project, workspace, script string) string {
	id := newInstanceID()
	e.store.put(instKey{project, script, id}, workspace, StatusRunning)
	return id
}

// AddRunning creates (or resets) a RUNNING instance with a chosen id.
func (e *Emulator) AddRunning(project, workspace, script, instanceID string) {
	e.store.put(instKey{project, script, instanceID}, workspace, StatusRunning)
}

// SetStatus sets an instance's status (any string; the Status* constants are
// the documented ones). An instance that does not exist is created in the
// default workspace.
func (e *Emulator) SetStatus(project, script, instanceID, status string) {
	e.store.setStatus(instKey{project, script, instanceID}, status)
}

// Status returns an instance's status and whether it exists.
func (e *Emulator) Status(project, script, instanceID string) (string, bool) {
	st, _, ok := e.store.snapshot(instKey{project, script, instanceID})
	return st, ok
}

// Stopped reports whether a stop request took effect on the instance (since
// it was last created or reset with Execute or AddRunning).
func (e *Emulator) Stopped(project, script, instanceID string) bool {
	_, stopped, _ := e.store.snapshot(instKey{project, script, instanceID})
	return stopped
}

// StopCalls returns how many stop requests the emulator received, whatever
// it answered (or did not answer).
func (e *Emulator) StopCalls() int64 { return e.stopCalls.Load() }

// StopCallsFor returns how many stop requests named this instance, whatever
// the answer, whether or not the instance exists.
func (e *Emulator) StopCallsFor(project, script, instanceID string) int64 {
	if ent := e.store.get(instKey{project, script, instanceID}); ent != nil {
		return ent.calls.Load()
	}
	return 0
}
