// This file runs the official Huawei Cloud Go SDK (huaweicloud-sdk-go-v3
// v0.1.207, core/auth/signer) over the requests our client builds and
// requires byte-identical Authorization and X-Sdk-Date headers. The known
// answers in sign_test.go were produced by the SDK and are checked against it
// here too, so they stay pinned even if this file has to go.

package dlf

import (
	"context"
	"net/url"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/auth"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/auth/signer"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/auth/signer/algorithm"
	"github.com/huaweicloud/huaweicloud-sdk-go-v3/core/request"
)

const sdkStopPath = "/v1/{project_id}/scripts/{script_name}/instances/{instance_id}/stop"

// sdkStopRequest builds the SDK request for CancelScript (the SDK's name for
// the stop call, services/dlf/v1 GenReqDefForCancelScript) with the headers
// the SDK itself puts on it: Content-Type application/json (from the
// operation), workspace (header param, only when set), X-Project-Id and
// X-Security-Token (from BasicCredentials), and a fixed X-Sdk-Date.
func sdkStopRequest(endpoint string, r StopRequest, cr Credentials, date string) *request.DefaultHttpRequest {
	b := request.NewHttpRequestBuilder().
		WithEndpoint(endpoint).
		WithMethod("POST").
		WithPath(sdkStopPath).
		WithSigningAlgorithm(algorithm.HmacSHA256).
		AddPathParam("script_name", r.ScriptName).
		AddPathParam("instance_id", r.InstanceID).
		AddAutoFilledPathParam("project_id", r.ProjectID).
		AddHeaderParam("X-Project-Id", r.ProjectID).
		AddHeaderParam("Content-Type", "application/json").
		AddHeaderParam("X-Sdk-Date", date)
	if r.Workspace != "" {
		b.AddHeaderParam("workspace", r.Workspace)
	}
	if cr.SecurityToken != "" {
		b.AddHeaderParam("X-Security-Token", cr.SecurityToken)
	}
	return b.Build()
}

// sdkSign signs with signer.Signer{}.Sign and returns the SDK request (its
// header map now holds X-Sdk-Date) and the added headers.
func sdkSign(t *testing.T, endpoint string, r StopRequest, cr Credentials, date string) (*request.DefaultHttpRequest, map[string]string) {
	t.Helper()
	req := sdkStopRequest(endpoint, r, cr, date)
	added, err := signer.Signer{}.Sign(req, cr.AK, cr.SK)
	if err != nil {
		t.Fatalf("SDK Sign: %v", err)
	}
	return req, added
}

// sdkPipeline signs through the SDK's credentials (BasicCredentials.
// ProcessAuthRequest), which adds X-Project-Id, the project id path
// parameter and X-Security-Token by itself, as the SDK client does.
func sdkPipeline(t *testing.T, endpoint string, r StopRequest, cr Credentials, date string) map[string]string {
	t.Helper()
	b := request.NewHttpRequestBuilder().
		WithEndpoint(endpoint).
		WithMethod("POST").
		WithPath(sdkStopPath).
		WithSigningAlgorithm(algorithm.HmacSHA256).
		AddPathParam("script_name", r.ScriptName).
		AddPathParam("instance_id", r.InstanceID).
		AddHeaderParam("Content-Type", "application/json").
		AddHeaderParam("X-Sdk-Date", date)
	if r.Workspace != "" {
		b.AddHeaderParam("workspace", r.Workspace)
	}
	cb := auth.NewBasicCredentialsBuilder().WithAk(cr.AK).WithSk(cr.SK).WithProjectId(r.ProjectID)
	if cr.SecurityToken != "" {
		cb.WithSecurityToken(cr.SecurityToken)
	}
	creds, err := cb.SafeBuild()
	if err != nil {
		t.Fatalf("SDK credentials: %v", err)
	}
	req, err := creds.ProcessAuthRequest(nil, b.Build())
	if err != nil {
		t.Fatalf("SDK ProcessAuthRequest: %v", err)
	}
	if !strings.Contains(req.GetPath(), "/"+r.ProjectID+"/") {
		t.Fatalf("SDK path %q lacks the project id", req.GetPath())
	}
	return req.GetHeaderParams()
}

func TestSignMatchesSDK(t *testing.T) {
	const endpoint = "https://dayu-dlf.cn-north-4.myhuaweicloud.com"
	for _, tc := range sdkStopCases() {
		t.Run(tc.name, func(t *testing.T) {
			if err := ValidateStopRequest(tc.req); err != nil {
				t.Fatalf("case is not a valid request: %v", err)
			}
			when, err := time.Parse(SdkDateFormat, tc.date)
			if err != nil {
				t.Fatal(err)
			}
			c, err := NewClient(Config{Endpoint: endpoint}, WithClock(func() time.Time { return when }))
			if err != nil {
				t.Fatal(err)
			}
			ours, err := c.newRequest(context.Background(), tc.req, tc.creds)
			if err != nil {
				t.Fatal(err)
			}

			sdkReq, added := sdkSign(t, endpoint, tc.req, tc.creds, tc.date)
			if got, want := ours.Header.Get("Authorization"), added["Authorization"]; got != want {
				t.Errorf("Authorization\n ours %s\n sdk  %s", got, want)
			}
			if got, want := ours.Header.Get("X-Sdk-Date"), added["X-Sdk-Date"]; got != want || got != tc.date {
				t.Errorf("X-Sdk-Date ours %q, sdk %q, want %q", got, want, tc.date)
			}
			pipe := sdkPipeline(t, endpoint, tc.req, tc.creds, tc.date)
			if got, want := pipe["Authorization"], added["Authorization"]; got != want {
				t.Errorf("SDK credentials pipeline differs from Signer.Sign\n pipeline %s\n signer   %s", got, want)
			}

			// Same path: the SDK signs the unescaped path; we send its
			// escaped form, which must be the canonical URI minus '/'.
			if ours.URL.Path != sdkReq.GetPath() {
				t.Errorf("path ours %q, sdk %q", ours.URL.Path, sdkReq.GetPath())
			}
			if got, want := ours.URL.EscapedPath()+"/", CanonicalURI(sdkReq.GetPath()); got != want {
				t.Errorf("wire path %q, canonical %q", got, want)
			}

			// Same headers: everything the SDK would send (its request map
			// plus what Sign added) is on ours, and ours has nothing more
			// but User-Agent.
			sdkHeaders := map[string]string{}
			for k, v := range pipe {
				sdkHeaders[strings.ToLower(k)] = v
			}
			for k, v := range sdkHeaders {
				if got := ours.Header.Get(k); got != v {
					t.Errorf("header %s: ours %q, sdk %q", k, got, v)
				}
			}
			for k := range ours.Header {
				if lk := strings.ToLower(k); lk != "user-agent" {
					if _, ok := sdkHeaders[lk]; !ok {
						t.Errorf("header %s is ours only", k)
					}
				}
			}
		})
	}
}

// TestSignGenericMatchesSDK covers SignRequest beyond the stop call: bodies,
// queries, a non-JSON Content-Type, headers the SDK never signs.
func TestSignGenericMatchesSDK(t *testing.T) {
	type generic struct {
		name, method, path string
		query              map[string]string
		headers            map[string]string
		body               string
		ak, sk             string
	}
	cases := []generic{
		{name: "get with query", method: "GET", path: "/v1/p/scripts", query: map[string]string{"limit": "10", "offset": "0", "name": "数据 a&b"}},
		{name: "json body", method: "POST", path: "/v1/p/scripts/s/execute", body: `{"params":{"a":"1"}}`, headers: map[string]string{"Content-Type": "application/json;charset=UTF-8"}},
		{name: "text body unsigned payload", method: "PUT", path: "/v1/p/x", body: "plain text", headers: map[string]string{"Content-Type": "text/plain"}},
		{name: "underscore header", method: "POST", path: "/v1/p/y", headers: map[string]string{"X_Custom_Thing": "v", "X-Other": "  padded  "}},
		{name: "escaped segments", method: "DELETE", path: "/v1/p/scripts/a b+c%d/instances/é", ak: "AK2", sk: "sk/with+chars="},
		{name: "trailing slash", method: "GET", path: "/v1/p/"},
		{name: "content hash given", method: "POST", path: "/v1/p/x", body: `{"a":1}`, headers: map[string]string{"X-Sdk-Content-Sha256": "abc"}},
		{name: "content hash empty", method: "POST", path: "/v1/p/x", body: `{"a":1}`, headers: map[string]string{"X-Sdk-Content-Sha256": ""}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			ak, sk := tc.ak, tc.sk
			if ak == "" {
				ak, sk = "QTWAOYTTINDUT2QVKYUC", "MFyfvK41ba2giqM7Uio6PznpdUKGpownRZlmVmHc"
			}
			const date = "20240315T093000Z"
			b := request.NewHttpRequestBuilder().WithEndpoint("https://example.com").WithMethod(tc.method).WithPath(tc.path).
				AddHeaderParam("X-Sdk-Date", date)
			for k, v := range tc.headers {
				b.AddHeaderParam(k, v)
			}
			for k, v := range tc.query {
				b.AddQueryParam(k, reflect.ValueOf(v))
			}
			if tc.body != "" {
				b.WithBody("", tc.body)
			}
			sdkReq := b.Build()
			added, err := signer.Signer{}.Sign(sdkReq, ak, sk)
			if err != nil {
				t.Fatal(err)
			}

			u := &url.URL{Scheme: "https", Host: "example.com", Path: tc.path}
			q := url.Values{}
			for k, v := range tc.query {
				q.Set(k, v)
			}
			u.RawQuery = q.Encode()
			r := newTestRequest(t, tc.method, u.String())
			for k, v := range tc.headers {
				r.Header[k] = []string{v} // as given, like the SDK's map
			}
			r.Header.Set("X-Sdk-Date", date)
			if err := SignRequest(r, []byte(tc.body), ak, sk, time.Time{}); err != nil {
				t.Fatal(err)
			}
			if got, want := r.Header.Get("Authorization"), added["Authorization"]; got != want {
				t.Errorf("Authorization\n ours %s\n sdk  %s", got, want)
			}
			if want := sdkReq.GetHeaderParams()["X-Sdk-Content-Sha256"]; r.Header.Get("X-Sdk-Content-Sha256") != want {
				t.Errorf("X-Sdk-Content-Sha256 ours %q, sdk %q", r.Header.Get("X-Sdk-Content-Sha256"), want)
			}
		})
	}
}

// TestSDKKnownAnswers checks that the SDK still produces the known answers
// that sign_test.go pins without it.
func TestSDKKnownAnswers(t *testing.T) {
	for _, ka := range knownAnswers {
		t.Run(ka.name, func(t *testing.T) {
			_, added := sdkSign(t, knownAnswerEndpoint, ka.req, ka.creds, ka.date)
			if added["Authorization"] != ka.authorization {
				t.Errorf("SDK gives\n %s\nknown answer\n %s", added["Authorization"], ka.authorization)
			}
		})
	}
}
