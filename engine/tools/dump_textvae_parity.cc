// Developer tool: writes the tiny text encoder's and VAE decoder's weights, inputs and outputs to
// two torch.load-able files so that engine/tools/check_textvae_parity.py can compare them with
// Hugging Face's UMT5EncoderModel and diffusers' AutoencoderKLWan on the same weights.
//
// Usage: sparge_dump_textvae_parity OUT_DIR   (writes OUT_DIR/umt5.pt and OUT_DIR/vae.pt)
// Built on demand only: ninja sparge_dump_textvae_parity.
#include <torch/torch.h>

#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "engine/models/umt5_encoder.h"
#include "engine/models/wan_vae_decoder.h"

namespace sparge::engine {
namespace {

bool Save(const c10::Dict<std::string, at::Tensor>& tensors, const std::string& path) {
  const std::vector<char> bytes = torch::pickle_save(tensors);
  std::ofstream out(path, std::ios::binary);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  return out.good();
}

// The tiny configuration fixed by the foundation issue, spelled out so that this tool does not
// depend on the pipeline's choice.
UMT5Config TinyText() {
  UMT5Config c;
  c.vocab_size = 512;
  c.d_model = 64;
  c.d_kv = 16;
  c.num_heads = 4;
  c.d_ff = 128;
  c.num_layers = 2;
  c.text_len = 64;
  return c;
}

WanVaeConfig TinyVae() {
  WanVaeConfig c;
  c.base_dim = 8;
  c.z_dim = 16;
  c.dim_mult = {1, 2, 4, 4};
  c.num_res_blocks = 1;
  c.temporal_downsample = {false, true, true};
  c.latents_mean = WanLatentsMean();
  c.latents_std = WanLatentsStd();
  return c;
}

int Run(const std::string& out_dir) {
  torch::NoGradGuard no_grad;
  auto tokenizer = Tokenizer::Embedded();
  if (!tokenizer.ok()) return std::cerr << tokenizer.status() << "\n", 1;
  auto encoder = TextEncoder::Create(TinyText(), std::move(tokenizer).value(), 42,
                                     torch::Device(torch::kCPU), torch::kFloat32);
  if (!encoder.ok()) return std::cerr << encoder.status() << "\n", 1;
  std::string long_prompt;
  for (int i = 0; i < 6; ++i)
    long_prompt += "A lighthouse shines across the sea on a foggy night. ";
  const std::vector<std::string> prompts = {"A red fox runs across a snowy field at dawn.",
                                            long_prompt};
  c10::Dict<std::string, at::Tensor> text;
  for (auto& [name, p] : (*encoder)->named_parameters()) text.insert("param." + name, p.clone());
  std::vector<int64_t> ids, mask;
  for (const std::string& prompt : prompts) {
    const Tokenizer::Encoded e = (*encoder)->tokenizer().Encode(prompt, TinyText().text_len);
    ids.insert(ids.end(), e.ids.begin(), e.ids.end());
    mask.insert(mask.end(), e.mask.begin(), e.mask.end());
  }
  const int64_t b = static_cast<int64_t>(prompts.size());
  text.insert("ids", torch::tensor(ids).view({b, -1}));
  text.insert("mask", torch::tensor(mask).view({b, -1}));
  auto context = (*encoder)->Encode(prompts);
  if (!context.ok()) return std::cerr << context.status() << "\n", 1;
  text.insert("out", *context);

  auto vae = VaeDecoder::Create(TinyVae(), 7, torch::Device(torch::kCPU));
  if (!vae.ok()) return std::cerr << vae.status() << "\n", 1;
  c10::Dict<std::string, at::Tensor> video;
  for (auto& [name, p] : (*vae)->named_parameters()) video.insert("param." + name, p.clone());
  torch::manual_seed(3);
  const torch::Tensor latents = torch::randn({1, 16, 4, 8, 8});
  auto frames = (*vae)->Decode(latents);
  if (!frames.ok()) return std::cerr << frames.status() << "\n", 1;
  video.insert("latents", latents);
  video.insert("latents_mean", torch::tensor(TinyVae().latents_mean));
  video.insert("latents_std", torch::tensor(TinyVae().latents_std));
  video.insert("out", *frames);

  if (!Save(text, out_dir + "/umt5.pt") || !Save(video, out_dir + "/vae.pt")) {
    std::cerr << "cannot write to " << out_dir << "\n";
    return 1;
  }
  std::cout << "wrote " << out_dir << "/umt5.pt and " << out_dir << "/vae.pt\n";
  return 0;
}

}  // namespace
}  // namespace sparge::engine

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " OUT_DIR\n";
    return 2;
  }
  return sparge::engine::Run(argv[1]);
}
